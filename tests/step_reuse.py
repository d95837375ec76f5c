"""Test helper: one jitted train step shared by several ``train_and_evaluate`` runs of a
test (a straight run, a killed run, its resume). The train step holds a host callback
(the Hungarian matching), which the persistent compilation cache does not store, so
without this every run would compile it again."""

from __future__ import annotations


def sharing_step_factory(real_factory, extra_key=lambda: None):
    """Returns ``(factory, compiled)``: ``factory`` has ``make_train_step``'s signature and
    hands out one step per (config, mesh or not, ``extra_key()``); ``compiled`` maps those
    keys to the steps built so far. Reuse is exact only when the optimiser is a function of
    the key: pass what else it depends on (e.g. the total steps) as ``extra_key``."""
    compiled: dict = {}

    def factory(graphdef, tx, config, mesh=None):
        key = (config.to_json_best_effort(), mesh is None, extra_key())
        if key not in compiled:
            compiled[key] = real_factory(graphdef, tx, config, mesh)
        return compiled[key]

    return factory, compiled
