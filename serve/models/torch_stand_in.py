"""anchor_detr_trt without TensorRT, a Triton Python-backend model (copied as REPO/anchor_detr_trt/1/model.py by
`python -m serve.triton --torch-weights`).

The engine step's name and I/O (`images`, `masks` in; the in-engine top-100 `scores`, `labels`, `boxes` out),
computed by the PyTorch reference from REPO/anchor_detr_trt/1/model.safetensors: for trying and testing the
ensemble where Triton has no TensorRT backend. Requests of one image size go through one forward.
"""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from serve.models import steps


class TritonPythonModel:
    def initialize(self, args):
        weights = Path(args["model_repository"]) / args["model_version"] / "model.safetensors"
        gpu = args["model_instance_kind"] == "GPU"
        self.engine = steps.EngineStandIn(weights, f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")

    def execute(self, requests):
        inputs = [tuple(pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in ("images", "masks"))
                  for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in out.items()])
                for out in self.engine.run_many(inputs)]

    def finalize(self):
        self.engine.close()
