"""The loss protocol's id, torch-free so that the file-only commands can name the current identity."""

# what per-draw losses are measured in: fp32; under bf16 autocast; or under bf16 autocast with the unlearned change
# evaluated as a separate matmul term, so that a change below half a bf16 step still counts (attribution/split.py)
LOSS_PRECISIONS = ("fp32", "bf16", "bf16-split")
# fp32 adds nothing: ids from before the precision stay valid
PRECISION_SUFFIX = {"fp32": "", "bf16": "-bf16", "bf16-split": "-bf16split"}


def check_precision(precision: str) -> str:
    """`precision` when it is one of LOSS_PRECISIONS, else a ValueError naming the choices and TDA_LOSS_PRECISION."""
    if precision not in LOSS_PRECISIONS:
        raise ValueError(
            f"loss precision {precision!r} is not one of {', '.join(LOSS_PRECISIONS)}: set TDA_LOSS_PRECISION "
            f"to one of them (unset means fp32)"
        )
    return precision


def protocol_id(seed: int, draws: int, first_draw: int = 0, precision: str = "fp32") -> str:
    """`s<seed>-k<draws>[-from<first_draw>][-bf16|-bf16split]`: what losses measured under a protocol are keyed by."""
    return (
        f"s{seed}-k{draws}"
        + (f"-from{first_draw}" if first_draw else "")
        + PRECISION_SUFFIX[check_precision(precision)]
    )


def precision_twin(a: str, b: str) -> bool:
    """Whether protocol ids `a` and `b` differ only by their loss precision."""
    return a != b and _without_precision(a) == _without_precision(b)


def _without_precision(pid: str) -> str:
    """Protocol id `pid` without its precision suffix (the longest that matches: `-bf16split` is not `-bf16`)."""
    for suffix in sorted(filter(None, PRECISION_SUFFIX.values()), key=len, reverse=True):
        if pid.endswith(suffix):
            return pid.removesuffix(suffix)
    return pid
