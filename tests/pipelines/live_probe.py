"""The hook script the live-control tests attach to a running run (test_live) and job
(test_live_control): `probe` records each step it sees, `halve` is a transform, which a
running run refuses to take."""

from pipelines.hooks import analyzer, transform


@analyzer(every=1, exact=True)  # exact: the ranks sample every step it is due
def probe(ctx):
    return {"seen": float(ctx.step)}


@transform
def halve(ctx):
    for g in ctx.grads.values():
        g *= 0.5
