"""canal.nodeagent: the per-node agent that redirects migrated Services' ClusterIPs to the gateway (xDS
client for redirect rules, nftables backend by default, IPVS backend with pyroute2)."""
