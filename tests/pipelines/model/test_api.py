"""The model core's public face: no private module defines a public class the package does not
export (tests/pipelines/test_public_api.py checks each name is exported once)."""

import pipelines.model as api
from pipelines.model import losses


def test_no_private_module_leaks_a_public_class_it_does_not_export():
    exported = set(api.__all__)
    for module in ("_module", "_layers", "_model", "_models"):
        mod = getattr(api, module)
        for name, value in vars(mod).items():
            if isinstance(value, type) and value.__module__ == mod.__name__ and not name[0] == "_":
                assert name in exported, f"pipelines.model.{module}.{name} is not exported"


def test_the_loss_registry_is_one_dict_shared_by_both_namespaces():
    assert api.LOSSES is losses.LOSSES
    assert set(losses.__all__) <= set(api.__all__) | {"LOSSES"}
