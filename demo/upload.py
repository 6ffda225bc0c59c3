"""The image input component. Kept alone in this module because Gradio writes a type stub
(upload.pyi) beside any module that defines a component subclass; it is generated, not source."""
from __future__ import annotations

import base64

import gradio as gr

from cifar_core.images import MAX_FILE_BYTES


class UploadImage(gr.Image):
    """gr.Image that hands the raw upload to cifar_core.images instead of decoding it itself.

    gr.Image would open the file with PIL before our code runs, so a non-image, a truncated file
    or a decompression bomb would fail inside Gradio with a generic error; here every upload
    reaches decode_for_model, which explains what is wrong."""
    is_template = True  # render with the stock image frontend

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):  # webcam / paste can arrive inline
            encoded = payload.url.split(",", 1)[-1]
            if len(encoded) > MAX_FILE_BYTES * 4 // 3 + 4:
                raise gr.Error(f"the image is larger than {MAX_FILE_BYTES // 2**20} MB", print_exception=False)
            try:
                return base64.b64decode(encoded, validate=False)
            except ValueError:
                raise gr.Error("the pasted image data is not valid base64", print_exception=False) from None
        if payload.path is None:
            raise gr.Error("the upload carried no file", print_exception=False)
        return payload.path
