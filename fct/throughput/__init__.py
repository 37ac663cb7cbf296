"""Throughput of the transformation step h against its GEMM peak and against backfilling.

Measured the way timm's ``benchmark.py`` does: warm-up calls, then timed calls with the device
synchronised inside each timed call, the batch halved on out-of-memory, and the thread count,
device and versions recorded with every number. Three things are measured in one run:

- h's embeddings/s at a batch size, for the variants ``eager`` (``Transformation.eval()``),
  ``folded`` (``FoldedTransformation``, what ``fct.context.apply_transformation`` runs) and
  ``compiled`` (``torch.compile`` of the folded module; with CUDA graphs on GPU);
- the *measured GEMM peak*: the FLOP/s of a plain sequence of GEMMs with h's exact layer
  shapes, same batch and dtype, for each GEMM library torch offers on the device (on CPU:
  ``torch.mm``, i.e. MKL/OpenBLAS, and oneDNN); the best is the peak, and
  ``fraction_of_gemm_peak = h FLOP/s / peak FLOP/s`` with h's FLOPs from
  ``transformation_flops``. A GEMM of the dominant shape alone ([batch, hidden] x
  [hidden, hidden]) is reported beside it;
- backfilling: images/s through the new model's forward (embedding only), so
  ``speedup_vs_backfill = h embeddings/s / backfill images/s``.

All variants of one configuration run interleaved, round after round, and medians are
reported: on a machine shared with other work, drift then hits every variant alike, so the
fractions stay meaningful even when the absolute numbers move. The fastest call of each
variant (``embeddings_per_s_fastest``) estimates what a quiet machine gives. See
docs/throughput.md.

Modules: ``presets`` (sizes, batches, device and dtype names), ``timing`` (the harness),
``gemm`` (the GEMM peak), ``measure`` (h's variants, backfill, ``measure`` and ``merge``),
``render`` (Markdown and plot). The ``fct bench`` command line is in fct.cli.
"""

from fct.throughput.gemm import gemm_backends, gemm_sequence, layer_shapes
from fct.throughput.measurement import (
    Variants,
    attach_backfill,
    build_transformation,
    measure,
    measure_backfill,
    measure_transformation,
    merge,
    prepare_variants,
    transformation_inputs,
)
from fct.throughput.presets import (
    DEFAULT_BATCHES,
    DTYPES,
    QUICK_BATCHES,
    SIZES,
    VARIANTS,
    Sizes,
    get_sizes,
    resolve_device,
    resolve_dtype,
)
from fct.throughput.render import plot, to_markdown
from fct.throughput.timing import (
    interleaved_medians,
    interleaved_times,
    timed_call,
    torch_threads,
    with_backoff,
)

__all__ = [
    "DEFAULT_BATCHES",
    "DTYPES",
    "QUICK_BATCHES",
    "SIZES",
    "VARIANTS",
    "Sizes",
    "Variants",
    "attach_backfill",
    "build_transformation",
    "gemm_backends",
    "gemm_sequence",
    "get_sizes",
    "interleaved_medians",
    "interleaved_times",
    "layer_shapes",
    "measure",
    "measure_backfill",
    "measure_transformation",
    "merge",
    "plot",
    "prepare_variants",
    "resolve_device",
    "resolve_dtype",
    "timed_call",
    "to_markdown",
    "torch_threads",
    "transformation_inputs",
    "with_backoff",
]
