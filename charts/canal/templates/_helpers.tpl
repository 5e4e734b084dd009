{{/* Names. A release called "canal" gets objects named canal-controller, canal-gateway...: the CLI defaults. */}}
{{- define "canal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "canal.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "canal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "canal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "controller") */}}
{{- define "canal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "canal.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "canal.componentLabels" -}}
{{ include "canal.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* HOST:PORT for a listen address, IPv6 hosts in brackets: (list "::" 18000) -> [::]:18000 */}}
{{- define "canal.hostPort" -}}
{{- $host := index . 0 }}
{{- if contains ":" $host }}[{{ $host }}]{{ else }}{{ $host }}{{ end }}:{{ index . 1 }}
{{- end }}

{{- define "canal.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "canal.controllerName" -}}{{ include "canal.fullname" . }}-controller{{- end }}
{{- define "canal.leaseName" -}}{{ include "canal.fullname" . }}-controller{{- end }}

{{/* The xDS server every gateway Envoy and node agent dials: the controller Service, or gateway.xdsAddress. */}}
{{- define "canal.xdsAddress" -}}
{{- if .Values.gateway.xdsAddress }}
{{- .Values.gateway.xdsAddress }}
{{- else }}
{{- printf "%s.%s.svc.%s:%d" (include "canal.controllerName" .) .Release.Namespace .Values.clusterDomain (int .Values.controller.xdsPort) }}
{{- end }}
{{- end }}

{{/* The xDS node group of the gateway Envoys: the InternalGateway they serve. */}}
{{- define "canal.group" -}}
{{- printf "%s/%s" .Release.Namespace .Values.internalGateway.name }}
{{- end }}

{{/* What the InternalGateway asks the node agents for (redirect.mode). */}}
{{- define "canal.redirectMode" -}}
{{- if .Values.nodeAgent.enabled }}{{ .Values.nodeAgent.backend }}{{ else }}none{{ end }}
{{- end }}

{{/*
A pod's annotations as a YAML map: Prometheus scrape annotations (prometheusAnnotations), then `extra` (the
component's podAnnotations and checksums; they win). (dict "ctx" $ "port" N "path" "/metrics" "extra" map)
*/}}
{{- define "canal.podAnnotations" -}}
{{- $out := dict }}
{{- if .ctx.Values.prometheusAnnotations }}
{{- $_ := set $out "prometheus.io/scrape" "true" }}
{{- $_ := set $out "prometheus.io/port" (toString .port) }}
{{- $_ := set $out "prometheus.io/path" .path }}
{{- end }}
{{- toYaml (mergeOverwrite $out (.extra | default dict)) }}
{{- end }}

{{/* The securityContext of every container that needs no privilege at all. */}}
{{- define "canal.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The node agent's (and the uninstall cleanup's) securityContext. Root, because Kubernetes grants added capabilities
to a non-root process only through file capabilities, which need allowPrivilegeEscalation (no_new_privs off): a
root process with every capability dropped but one is the narrower grant.
  NET_ADMIN: nftables and IPVS are configured over netlink (NETLINK_NETFILTER, the IPVS generic netlink family),
             which the kernel allows only with CAP_NET_ADMIN in the network namespace (the node's: hostNetwork).
             libnftables' socket buffer resize (SO_RCVBUFFORCE) is covered by it too.
Nothing else: no NET_RAW (no raw sockets), no SYS_MODULE (the agent never loads kernel modules; without nf_tables
or ip_vs it stops and names them), no SYS_ADMIN (no namespace switching in the cluster). The IPVS backend reads
net.ipv4.vs.conntrack, which kube-proxy's IPVS mode already sets to 1; /proc/sys stays read-only.
*/}}
{{- define "canal.netAdminContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: false
runAsUser: 0
runAsGroup: 0
privileged: false
capabilities:
  drop: [ALL]
  add: [NET_ADMIN]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Node affinity of the node agent (and its cleanup): every node but the gateway nodes. */}}
{{- define "canal.agentAffinity" -}}
{{- if .Values.nodeAgent.affinity }}
{{- toYaml .Values.nodeAgent.affinity }}
{{- else }}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
    - matchExpressions:
      - key: {{ .Values.gatewayNodes.labelKey | quote }}
        operator: NotIn
        values: [{{ .Values.gatewayNodes.labelValue | quote }}]
{{- end }}
{{- end }}

{{/*
The gateway's listener ports: per server, the port itself (unsharded) or one per shard
(shardTargetPortBase + i * shards + k). A list of dicts: server, shard, port.
*/}}
{{- define "canal.listenerPorts" -}}
{{- $shards := int .Values.internalGateway.shards }}
{{- $base := int .Values.gateway.shardTargetPortBase }}
{{- $out := list }}
{{- range $i, $s := .Values.gateway.servers }}
{{- if le $shards 1 }}
{{- $out = append $out (dict "server" $s.name "shard" -1 "port" (int $s.port)) }}
{{- else }}
{{- range $k := until $shards }}
{{- $out = append $out (dict "server" $s.name "shard" $k "port" (add $base (mul $i $shards) $k)) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson (dict "ports" $out) }}
{{- end }}

{{/* Cross-field checks a JSON schema cannot express; each fails the install with the reason. */}}
{{- define "canal.validate" -}}
{{- $ports := (include "canal.listenerPorts" . | fromJson).ports }}
{{- $seen := dict }}
{{- range .Values.gateway.servers }}
{{- if hasKey $seen (toString .port) }}
{{- fail (printf "gateway.servers: port %d is listed twice (%s and %s)" (int .port) (get $seen (toString .port)) .name) }}
{{- end }}
{{- $_ := set $seen (toString .port) .name }}
{{- end }}
{{- $names := dict }}
{{- range .Values.gateway.servers }}
{{- if hasKey $names .name }}
{{- fail (printf "gateway.servers: name %q is used by more than one server (Service port names must be unique)" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- range $ports }}
{{- if gt (int .port) 65535 }}
{{- fail (printf "gateway.shardTargetPortBase: shard %d of server %s would listen on port %d (> 65535); lower the base or the shards" (int .shard) .server (int .port)) }}
{{- end }}
{{- if or (eq (int .port) (int $.Values.gateway.statusPort)) (eq (int .port) (int $.Values.gateway.adminPort)) }}
{{- fail (printf "gateway: listener port %d (server %s) is also gateway.statusPort or gateway.adminPort" (int .port) .server) }}
{{- end }}
{{- end }}
{{- if and (gt (int .Values.gateway.preStopSleepSeconds) 0) (ge (int .Values.gateway.preStopSleepSeconds) (int .Values.gateway.terminationGracePeriodSeconds)) }}
{{- fail "gateway.preStopSleepSeconds must be shorter than gateway.terminationGracePeriodSeconds (Envoy is killed at the end of the grace period)" }}
{{- end }}
{{- if eq (int .Values.gateway.statusPort) (int .Values.gateway.adminPort) }}
{{- fail "gateway.statusPort and gateway.adminPort must differ" }}
{{- end }}
{{- if eq (int .Values.controller.xdsPort) (int .Values.controller.metricsPort) }}
{{- fail "controller.xdsPort and controller.metricsPort must differ" }}
{{- end }}
{{- if and (eq .Values.dns.mode "server") (or (eq (int .Values.dns.server.port) (int .Values.controller.xdsPort)) (eq (int .Values.dns.server.port) (int .Values.controller.metricsPort))) }}
{{- fail "dns.server.port must differ from controller.xdsPort and controller.metricsPort" }}
{{- end }}
{{- if ge (float64 .Values.controller.leaderElection.renewDeadline) (float64 .Values.controller.leaderElection.leaseDuration) }}
{{- fail "controller.leaderElection.renewDeadline must be shorter than leaseDuration" }}
{{- end }}
{{- if lt (float64 .Values.controller.maxDelay) (float64 .Values.controller.quietPeriod) }}
{{- fail "controller.maxDelay must be at least controller.quietPeriod" }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- end }}

{{/*
The gateway Envoy's bootstrap: exactly what `canal bootstrap` prints (canal.xds.bootstrap.bootstrap, which
tests/test_chart.py compares it with) for the xDS address and group, with node.id a placeholder the pod replaces
by its own name (--service-node overrides node.id). Keep in step with xds/bootstrap.py.
*/}}
{{- define "canal.gatewayBootstrap" -}}
{{- $address := include "canal.xdsAddress" . }}
{{- $port := regexFind "[0-9]+$" $address }}
{{- $host := trimSuffix (printf ":%s" $port) $address | trimPrefix "[" | trimSuffix "]" }}
{{- $isIP := or (regexMatch "^[0-9]{1,3}([.][0-9]{1,3}){3}$" $host) (contains ":" $host) -}}
node:
  id: {{ include "canal.fullname" . }}-gateway
  cluster: {{ include "canal.group" . }}
  metadata:
    canal.io/group: {{ include "canal.group" . }}
dynamic_resources:
  ads_config:
    api_type: {{ if .Values.gateway.delta }}DELTA_GRPC{{ else }}GRPC{{ end }}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
    - envoy_grpc:
        cluster_name: canal-xds
        retry_policy:
          retry_back_off:
            base_interval: 0.25s
            max_interval: 5s
  lds_config:
    ads: {}
    resource_api_version: V3
    initial_fetch_timeout: 0s
  cds_config:
    ads: {}
    resource_api_version: V3
    initial_fetch_timeout: 0s
static_resources:
  clusters:
  - name: canal-xds
    type: {{ if $isIP }}STATIC{{ else }}STRICT_DNS{{ end }}
    connect_timeout: 1s
    load_assignment:
      cluster_name: canal-xds
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address:
                address: {{ $host | quote }}
                port_value: {{ $port }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options:
            connection_keepalive:
              interval: 30s
              timeout: 5s
    upstream_connection_options:
      tcp_keepalive: {}
layered_runtime:
  layers:
  - name: static
    static_layer:
      re2.max_program_size.error_level: 32768
  - name: admin
    admin_layer: {}
admin:
  address:
    socket_address:
      address: 127.0.0.1
      port_value: {{ int .Values.gateway.adminPort }}
{{- end }}

{{/*
The gateway's status listener, merged into the bootstrap with --config-yaml (so the ConfigMap stays exactly
`canal bootstrap`'s output). Envoy's admin interface listens on 127.0.0.1 only (it can change the server), so the
kubelet cannot probe it; this listener answers the probes on the pod IP and exposes nothing of the admin but its
read-only Prometheus stats:
  /ready             the health_check filter: 200 once Envoy serves (its listeners open only after the first
                     xDS round or the initial fetch timeout), 503 while it drains or fails health checks;
  /healthz           a direct 200 from a worker thread: Envoy is alive and handling requests;
  /stats/prometheus  proxied to the admin interface.
*/}}
{{- define "canal.gatewayStatusConfig" -}}
static_resources:
  listeners:
  - name: canal-status
    address:
      socket_address: {address: 0.0.0.0, port_value: {{ int .Values.gateway.statusPort }}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: canal_status
          route_config:
            name: canal-status
            virtual_hosts:
            - name: status
              domains: ["*"]
              routes:
              - match: {path: /healthz}
                direct_response: {status: 200, body: {inline_string: "ok\n"}}
              - match: {path: /stats/prometheus}
                route: {cluster: canal-admin}
          http_filters:
          - name: envoy.filters.http.health_check
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
              pass_through_mode: false
              headers:
              - name: :path
                string_match: {exact: /ready}
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: canal-admin
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: canal-admin
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: 127.0.0.1, port_value: {{ int .Values.gateway.adminPort }}}
{{- end }}
