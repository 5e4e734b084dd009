"""canal.dns: the DNS record table, Canal's DNS server (dnslib, asyncio UDP + TCP), and the CoreDNS Corefile
editor and ConfigMap writer.

From a checkout this folder can also import as a top-level ``dns`` package (the name dnspython uses);
``extend_path`` keeps dnspython importable in that case.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
