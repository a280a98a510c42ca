"""The command-line scripts, importable as ``gkg_pyg.experiments`` once the
package is installed (``pyproject.toml`` maps that package to this folder).

Each script is a module with ``main(argv=None) -> int``: the console
commands ``gkg-train``, ``gkg-evaluate``, ``gkg-predict``, ``gkg-export`` and
``gkg-inspect`` call the ``main`` of train.py, evaluate.py, predict.py,
export.py and inspect_graphs.py, with the same arguments as
``python experiments/<script>.py`` from a checkout.
"""
