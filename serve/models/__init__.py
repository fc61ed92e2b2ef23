"""The Python-backend models of the ensemble that `python -m serve.triton` writes.

`pre.py`, `post.py` and `torch_stand_in.py` are Triton Python-backend model files: the repository writer copies
each as ``REPO/<model>/1/model.py``. They import ``triton_python_backend_utils``, which exists only inside Triton's
Python-backend stub, and keep to moving tensors in and out; what they compute is in `steps`, which imports
anywhere and is tested on its own.
"""
