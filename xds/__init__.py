"""canal.xds: the xDS control plane for the gateway Envoys (ADS, SotW and Delta), its snapshot cache, the
Envoy resource builders, the redirect-rule resource type and the Envoy bootstrap.

Run from a checkout, the repository root can land on sys.path (``python -m``, ``python -c``) and this folder
then also imports as the top-level ``xds`` package that xds-protos ships and Envoy's generated protos import.
``extend_path`` makes both trees visible under that name, so nothing breaks; never name a module here after
an xds-protos subpackage (annotations, core, data, service, type).
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
