"""Triton kernels, installed as ``cpift_dist.kernels`` (a PyPI package named ``kernels`` exists).

A process whose ``sys.path`` holds the repository's root (``python -m pytest`` or ``python -c``
started there, a notebook, a Ray worker started in it) finds this directory as the top-level
package ``kernels``, ahead of the PyPI package of that name. transformers 5.25 and later
require that package and import it with every model class (``transformers.integrations.
hub_kernels``): shadowed, ``from kernels import CUDAProperties`` fails and no model loads. So,
imported under that name, this module loads the PyPI package in its own place (the import
system returns what ``sys.modules`` holds once the module has run). Where that package is not
installed it stays an empty module without a version, which transformers treats as no
``kernels`` at all.
"""

if __name__ == "kernels":
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    def _load_pypi_kernels() -> None:
        mine_file = os.path.realpath(__file__)
        root = os.path.dirname(os.path.dirname(mine_file))
        path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
        spec = PathFinder.find_spec(__name__, path)
        if (spec is None or spec.loader is None or spec.origin is None
                or os.path.realpath(spec.origin) == mine_file):
            return
        module = importlib.util.module_from_spec(spec)
        mine = sys.modules[__name__]
        sys.modules[__name__] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules[__name__] = mine
            raise

    _load_pypi_kernels()
    del _load_pypi_kernels
