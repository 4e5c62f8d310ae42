"""The one shape of every backbone family's variant table: `VARIANTS = {name: Variant(...)}`, where each
family's `Variant` is a NamedTuple whose fields say what they are (depths, widths, ...)."""


def lookup(family: str, variants: dict, name):
    """`variants[name]`, or a ValueError listing the valid names (the config check reports it)."""
    if name not in variants:
        raise ValueError(f"{family} variant '{name}' unknown; expected one of {', '.join(variants)}")
    return variants[name]
