"""Walking jaxprs, for tests that check what a compiled function contains (precisions, casts, loops)."""


def iter_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (pjit, custom_vjp, while, scan, cond, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from iter_eqns(inner)
