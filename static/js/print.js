// The Print button of a printable page (the patient handout): a module, because the
// Content-Security-Policy allows no inline script or onclick attribute. The print styles in
// relay.css decide what reaches the paper.
for (const button of document.querySelectorAll("[data-print]")) {
  button.addEventListener("click", () => window.print());
}
