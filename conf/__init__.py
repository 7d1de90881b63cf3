"""lorasweep's config groups, installed as the package ``lorasweep.conf`` (see pyproject.toml).

The YAML files here (and ``sweep/``, a link to the repository's ``sweeps/``) are what the
``lorasweep`` command composes; ``lorasweep.cli.conf_dir`` finds this folder with importlib.resources.
"""
