"""The loss protocol's id, torch-free so that the file-only commands can name the current identity."""


def protocol_id(seed: int, draws: int, first_draw: int = 0) -> str:
    """`s<seed>-k<draws>[-from<first_draw>]`: what losses measured under a protocol are keyed by."""
    return f"s{seed}-k{draws}" + (f"-from{first_draw}" if first_draw else "")
