"""Where a benchmark run is: which op, which case of how many, which provider of how many."""


def case_label(op, index, total, description):
    """``[op case i/n: description]``, printed before every line of a case."""
    return f"[{op} case {index}/{total}: {description}]"


def provider_label(index, total, name):
    return f"{name} ({index}/{total})"
