"""anchor_detr_post, a Triton Python-backend model (copied as REPO/anchor_detr_post/1/model.py by serve.triton).

Per request: the engine's top-100 (`top_scores`, `top_labels`, `top_boxes` relative to the image) and the image's
`original_size` become serve.server's answer: `count`, `scores`, `labels`, `boxes` in the image's pixels at or
above the request's `threshold` (default 0.5), `names` (the class names of the labels), `size`, and an empty `error`.
"""

import json

import triton_python_backend_utils as pb_utils

from serve.models import steps

INPUTS = ("top_scores", "top_labels", "top_boxes", "original_size")


class TritonPythonModel:
    def initialize(self, args):
        self.names = steps.class_names(steps.parameters(json.loads(args["model_config"])))

    def execute(self, requests):
        responses = []
        for request in requests:
            scores, labels, boxes, sizes = (pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in INPUTS)
            threshold = pb_utils.get_input_tensor_by_name(request, "threshold")
            try:
                out = steps.answer(scores, labels, boxes, sizes, None if threshold is None else threshold.as_numpy(),
                                   self.names)
            except steps.RequestError as exc:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in out.items()]))
        return responses
