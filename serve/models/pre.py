"""anchor_detr_pre, a Triton Python-backend model (copied as REPO/anchor_detr_pre/1/model.py by serve.triton).

Per request: the encoded image (BYTES) and the optional threshold are checked; then the batch's images are
decoded (on a GPU instance its JPEGs in one nvImageCodec call into device memory, as the `decode` parameter says;
else Pillow: serve.models.steps). A bad one is that request's error (INVALID_ARG, HTTP 400) and the other requests
of the batch go on. The good images of the batch become one batch padded to its largest image, so the engine step's
dynamic batcher, which groups only requests of one shape, can put them back together. On a GPU instance the batch
is made by our kernel in device memory (reading the decoded images where they are) and handed on through DLPack,
never through host memory; on a CPU instance as numpy arrays.
Outputs per request: `images` (k,3,H,W) FP32, `masks` (k,H,W) BOOL, `original_size` (k,2) INT32 height, width.
"""

import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

from serve.models import steps


def _tensor(name, array):
    if isinstance(array, np.ndarray):
        return pb_utils.Tensor(name, array)
    # The capsule itself: the kernel's stream is already synchronised, so no stream needs handing over.
    return pb_utils.Tensor.from_dlpack(name, array.__dlpack__())


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        device = int(args["model_instance_device_id"]) if args["model_instance_kind"] == "GPU" else None
        self.pre = steps.Preprocess.from_parameters(steps.parameters(config), device, config["max_batch_size"])
        print(f"anchor_detr_pre instance {args['model_instance_name']}: decoding with {self.pre.decoding}",
              file=sys.stderr, flush=True)

    def execute(self, requests):
        responses = [None] * len(requests)
        inputs = []
        for request in requests:
            threshold = pb_utils.get_input_tensor_by_name(request, "threshold")
            inputs.append((pb_utils.get_input_tensor_by_name(request, "image").as_numpy(),
                           None if threshold is None else threshold.as_numpy()))
        good = []  # (request index, its decoded images)
        for index, images in enumerate(self.pre.requests(inputs)):
            if isinstance(images, steps.RequestError):
                responses[index] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(images), pb_utils.TritonError.INVALID_ARG))
            else:
                good.append((index, images))
        if good:
            batch, masks = self.pre.batch([image for _, images in good for image in images])
            start = 0
            for index, images in good:
                stop = start + len(images)
                sizes = np.array([(image.height, image.width) for image in images], dtype=np.int32)
                responses[index] = pb_utils.InferenceResponse([
                    _tensor("images", steps.rows(batch, start, stop)), _tensor("masks", steps.rows(masks, start, stop)),
                    pb_utils.Tensor("original_size", sizes),
                ])
                start = stop
        return responses

    def finalize(self):
        self.pre.close()
