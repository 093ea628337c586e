"""Factor stacks → a merge space.

* `knots_svd`: KnOTS' joint SVD of one stack, from the factors (QR + the SVD of
  a small matrix; exact) or from the dense updates (the reference).
* `decompose`: `align`, the joint decomposition of every stack (`Alignment`).
* `core_space`: the Core Space basis and each task's core matrix.
* `cache`: an `Alignment` saved with Orbax and restored onto any mesh.
"""

__all__ = ["cache", "core_space", "decompose", "knots_svd"]
