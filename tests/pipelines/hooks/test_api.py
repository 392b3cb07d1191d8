import pipelines.hooks as hooks
import pipelines.hooks.builtins as builtins


def test_every_public_name_is_exported_once_and_exists():
    public = hooks.__all__ + builtins.__all__
    assert len(public) == len(set(public))
    for module in (hooks, builtins):
        for name in module.__all__:
            assert hasattr(module, name), name


def test_the_package_exports_no_private_module_names():
    assert not [n for n in hooks.__all__ if n.startswith("_")]
