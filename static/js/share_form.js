// The share form, facility step: the "Import to their PACS" right follows the chosen facility
// (on when its option says data-has-pacs="true"), until the sender sets the box themselves.
// Without JavaScript the server's default stands (see ShareForm in transfers/sharing/views.py).
const select = document.getElementById("id_recipient_facility");
const importBox = document.getElementById("id_can_import");

if (select && importBox) {
  const serverDefault = importBox.checked;
  let touched = false;
  importBox.addEventListener("change", () => { touched = true; });
  const follow = () => {
    if (touched) return;
    const option = select.selectedOptions[0];
    importBox.checked = option && option.dataset.hasPacs ? option.dataset.hasPacs === "true" : serverDefault;
  };
  select.addEventListener("change", follow);
  // A form shown again after a refusal keeps what was sent; only a fresh form follows at once.
  if (!document.querySelector(".share-form .field-error")) follow();
}
