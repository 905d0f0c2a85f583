"""The loss protocol's id, torch-free so that the file-only commands can name the current identity."""

LOSS_PRECISIONS = ("fp32", "bf16")  # what per-draw losses are measured in: fp32, or under bf16 autocast
PRECISION_SUFFIX = {"fp32": "", "bf16": "-bf16"}  # fp32 adds nothing: ids from before the precision stay valid


def check_precision(precision: str) -> str:
    """`precision` when it is one of LOSS_PRECISIONS, else a ValueError naming the choices and TDA_LOSS_PRECISION."""
    if precision not in LOSS_PRECISIONS:
        raise ValueError(
            f"loss precision {precision!r} is not one of {', '.join(LOSS_PRECISIONS)}: set TDA_LOSS_PRECISION "
            f"to one of them (unset means fp32)"
        )
    return precision


def protocol_id(seed: int, draws: int, first_draw: int = 0, precision: str = "fp32") -> str:
    """`s<seed>-k<draws>[-from<first_draw>][-bf16]`: what losses measured under a protocol are keyed by."""
    return (
        f"s{seed}-k{draws}"
        + (f"-from{first_draw}" if first_draw else "")
        + PRECISION_SUFFIX[check_precision(precision)]
    )


def precision_twin(a: str, b: str) -> bool:
    """Whether protocol ids `a` and `b` differ only by their loss precision."""
    strip = lambda pid: pid.removesuffix(PRECISION_SUFFIX["bf16"])  # noqa: E731
    return a != b and strip(a) == strip(b)
