{{/* Names and labels */}}
{{- define "ridgeline.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "ridgeline.labels" -}}
app.kubernetes.io/name: ridgeline
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ridgeline.rayPodLabels" -}}
app.kubernetes.io/name: ridgeline
app.kubernetes.io/instance: {{ .Release.Name }}
ridgeline.io/ray-pod: "true"
{{- end -}}

{{/* Cross-field rules the schema cannot express; each failure names the value and what is allowed. */}}
{{- define "ridgeline.validate" -}}
{{- $names := list -}}
{{- $priorities := list -}}
{{- range .Values.sloClasses -}}
{{- if has .name $names -}}{{- fail (printf "sloClasses: class %q appears twice" .name) -}}{{- end -}}
{{- if has (toString .priority) $priorities -}}{{- fail (printf "sloClasses: priority %v is used twice" .priority) -}}{{- end -}}
{{- $names = append $names .name -}}
{{- $priorities = append $priorities (toString .priority) -}}
{{- end -}}
{{- if not (has .Values.sloDefault $names) -}}
{{- fail (printf "sloDefault: unknown SLO class %q, allowed: %s" .Values.sloDefault (join ", " $names)) -}}
{{- end -}}
{{- if and (eq .Values.mode "disaggregated") (not .Values.pools.prefill) -}}
{{- fail "pools.prefill: mode disaggregated needs a prefill pool (or set mode: aggregated)" -}}
{{- end -}}
{{- range $name, $pool := .Values.pools -}}
{{- if and (gt (int $pool.gpus) 0) (not $pool.gpuType) -}}
{{- fail (printf "pools.%s.gpuType: a GPU pool (gpus: %v) must name its GPU type, e.g. H200" $name $pool.gpus) -}}
{{- end -}}
{{- if lt (int $pool.replicas) 1 -}}
{{- fail (printf "pools.%s.replicas: got %v, allowed >= 1" $name $pool.replicas) -}}
{{- end -}}
{{- if and (ne $pool.kvMemory.ssd.type "none") (eq (int $pool.kvMemory.dramBlocks) 0) -}}
{{- fail (printf "pools.%s.kvMemory.ssd: an SSD tier needs dramBlocks >= 1 (SSD sits below DRAM)" $name) -}}
{{- end -}}
{{- if and (eq $pool.kvMemory.ssd.type "pvc") (not $pool.kvMemory.ssd.claimName) -}}
{{- fail (printf "pools.%s.kvMemory.ssd.claimName: type pvc needs a claimName" $name) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.registry.etcd.mode "external") (not .Values.registry.etcd.externalEndpoint) -}}
{{- fail "registry.etcd.externalEndpoint: mode external needs etcd://HOST:PORT" -}}
{{- end -}}
{{- end -}}

{{- define "ridgeline.registryURL" -}}
{{- $etcd := .Values.registry.etcd -}}
{{- if eq $etcd.mode "internal" -}}etcd://{{ include "ridgeline.fullname" . }}-etcd:2379
{{- else if eq $etcd.mode "external" -}}{{ $etcd.externalEndpoint }}
{{- else -}}embedded{{- end -}}
{{- end -}}

{{/* One pool's ServeConfig fields (services/app.py:PoolConfig). */}}
{{- define "ridgeline.poolArgs" -}}
{{- $pool := .pool -}}
replicas: {{ $pool.replicas }}
num_cpus: 1
num_gpus: {{ $pool.gpus }}
device: {{ if gt (int $pool.gpus) 0 }}{{ $pool.gpuType | quote }}{{ else }}cpu{{ end }}
{{- if ne $pool.pricePerHour nil }}
price_per_hour: {{ $pool.pricePerHour }}
{{- end }}
weight_dtype: {{ $pool.weightDtype | default "auto" }}
kv_dtype: {{ $pool.kvDtype | default "auto" }}
{{- with $pool.kvAgePolicy }}
kv_age_policy: {{ . | toJson }}
{{- end }}
engine: {{ $pool.engine | default dict | toJson }}
kv_dram_blocks: {{ $pool.kvMemory.dramBlocks }}
{{- if ne $pool.kvMemory.ssd.type "none" }}
kv_ssd_dir: /var/lib/ridgeline/kv-ssd
kv_ssd_blocks: {{ $pool.kvMemory.ssdBlocks }}
{{- end }}
kv_memory: {{ .kvMemoryMode }}
ray_resources: {{ printf "{\"ridgeline_%s\": 1}" .name }}
{{- end -}}

{{/* The Serve application: services/app.py:app_builder takes these args as a ServeConfig. */}}
{{- define "ridgeline.serveConfig" -}}
applications:
  - name: ridgeline
    route_prefix: /
    import_path: services.app:app_builder
    args:
      model: {{ .Values.model.path | quote }}
      {{- with .Values.model.servedName }}
      served_model_name: {{ . | quote }}
      {{- end }}
      mode: {{ .Values.mode }}
      router: {{ .Values.router }}
      kv_transport: {{ .Values.kvTransport }}
      max_inflight: {{ .Values.maxInflight }}
      max_migrations: {{ .Values.maxMigrations }}
      admission: {{ .Values.admission }}
      registry: {{ include "ridgeline.registryURL" . | quote }}
      registry_ttl_s: {{ .Values.registry.ttlSeconds }}
      slo_default: {{ .Values.sloDefault }}
      slo_classes:
        {{- toYaml .Values.sloClasses | nindent 8 }}
      spec: {{ .Values.speculative.method }}
      num_speculative_tokens: {{ .Values.speculative.numTokens }}
      {{- if eq .Values.speculative.method "draft" }}
      {{- $d := .Values.speculative.draft }}
      draft:
        model: {{ $d.model | quote }}
        replicas: {{ $d.replicas }}
        num_cpus: {{ $d.cpu }}
        deadline_s: {{ $d.deadlineSeconds }}
        ray_resources: {"ridgeline_draft": 1}
      {{- end }}
      {{- if .Values.tracing.otlpEndpoint }}
      env:
        OTEL_EXPORTER_OTLP_ENDPOINT: {{ .Values.tracing.otlpEndpoint | quote }}
        OTEL_SERVICE_NAME: ridgeline
      {{- end }}
      {{- range $name, $pool := .Values.pools }}
      {{- if or (eq $name "decode") (eq $.Values.mode "disaggregated") }}
      {{ $name }}:
        {{- include "ridgeline.poolArgs" (dict "pool" $pool "name" $name "kvMemoryMode" $.Values.kvMemoryMode) | nindent 8 }}
      {{- end }}
      {{- end }}
{{- end -}}

{{/* The environment of every Ray pod. */}}
{{- define "ridgeline.env" -}}
- name: HF_HUB_OFFLINE
  value: "1"
# Serve's HTTP proxy behind Ridgeline's request body and header limits (services/http_limits.py)
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: services.http_limits:proxy_middlewares
{{- range $k, $v := .Values.nixl.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- range $k, $v := .Values.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- if .Values.apiKey.secretName }}
- name: RIDGELINE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.secretName }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- end -}}
