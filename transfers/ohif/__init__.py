"""OHIF as the advanced viewer: its prebuilt package installed from the npm registry and served
by Relay under /ohif/, reading the signed-in user's studies through Relay's own /dicom-web/.

`install` fetches, verifies and rewrites the build (the `ohif_install` command and `make install`
run it); `views` serves the result with its own Content-Security-Policy; `context_processors`
tells the study page and the inbox whether to offer "Open in advanced viewer".
"""
