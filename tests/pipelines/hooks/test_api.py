import inspect

import pipelines.hooks as hooks
import pipelines.hooks.builtins as builtins


def test_every_public_name_is_exported_once_and_exists():
    public = hooks.__all__ + builtins.__all__
    assert len(public) == len(set(public))
    for module in (hooks, builtins):
        for name in module.__all__:
            assert hasattr(module, name), name


def test_every_public_name_of_the_package_is_in_its_all():
    def public(module, defined_here_only):
        return {
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and not inspect.ismodule(value)
            and not (  # imported from elsewhere (constants carry no __module__)
                defined_here_only
                and getattr(value, "__module__", None) not in (None, module.__name__)
            )
        }

    assert set(hooks.__all__) == public(hooks, defined_here_only=False) - {"annotations"}
    assert set(builtins.__all__) == public(builtins, defined_here_only=True)


def test_the_package_exports_no_private_module_names():
    assert not [n for n in hooks.__all__ if n.startswith("_")]
