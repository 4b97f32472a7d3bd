{{/* The five services, in pipeline order. */}}
{{- define "gpu-fleet.serviceNames" -}}
admission packer forecast resolver binder
{{- end -}}

{{/* Object name prefix: the release name unless overridden. */}}
{{- define "gpu-fleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if .Values.nameOverride -}}
{{- printf "%s-%s" .Release.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gpu-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "gpu-fleet.labels" -}}
helm.sh/chart: {{ include "gpu-fleet.chart" . }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "gpu-fleet.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: jobtree
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "binder"). */}}
{{- define "gpu-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image tag as text. `--set image.tag=<all-digit git SHA>` makes it a number, and
     `helm upgrade --reuse-values` turns that number into a float (1.149504e+06), so a float with
     no fraction is printed as the integer it is. */}}
{{- define "gpu-fleet.imageTag" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if and (kindIs "float64" $tag) (eq $tag (float64 (int64 $tag))) -}}
{{- int64 $tag -}}
{{- else -}}
{{- $tag | toString -}}
{{- end -}}
{{- end -}}

{{- define "gpu-fleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "gpu-fleet.imageTag" .) -}}
{{- end -}}

{{/* ServiceAccount of one service: (dict "root" $ "service" "binder"). */}}
{{- define "gpu-fleet.serviceAccountName" -}}
{{- printf "%s-%s" (include "gpu-fleet.fullname" .root) .service -}}
{{- end -}}

{{- define "gpu-fleet.webhookServiceName" -}}
{{- printf "%s-webhook" (include "gpu-fleet.fullname" .) -}}
{{- end -}}

{{- define "gpu-fleet.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "gpu-fleet.fullname" .) -}}
{{- end -}}

{{- define "gpu-fleet.natsName" -}}
{{- printf "%s-nats" (include "gpu-fleet.fullname" .) -}}
{{- end -}}

{{/* The NATS identities (shared/bus/subjects.py IDENTITIES): one user and Secret each. */}}
{{- define "gpu-fleet.natsIdentities" -}}
admission packer forecast resolver binder operator
{{- end -}}

{{/* Secret holding one identity's NATS password: (dict "root" $ "identity" "binder"). */}}
{{- define "gpu-fleet.natsSecretName" -}}
{{- printf "%s-nats-%s" (include "gpu-fleet.fullname" .root) .identity -}}
{{- end -}}

{{/* Whether the bundled NATS serves TLS. */}}
{{- define "gpu-fleet.natsTLS" -}}
{{- if and .Values.nats.bundled .Values.nats.tls.enabled -}}true{{- end -}}
{{- end -}}

{{/* Does the cluster (or `helm template --api-versions`) serve the Prometheus Operator API? */}}
{{- define "gpu-fleet.hasMonitoring" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/* Render the dashboard ConfigMap? grafana.dashboards.enabled: auto | true | false. */}}
{{- define "gpu-fleet.dashboardsEnabled" -}}
{{- $mode := .Values.grafana.dashboards.enabled | toString | lower -}}
{{- if eq $mode "true" -}}true
{{- else if and (eq $mode "auto") (include "gpu-fleet.hasMonitoring" .) -}}true
{{- else if not (has $mode (list "true" "false" "auto")) -}}
{{- fail (printf "grafana.dashboards.enabled must be auto, true or false, not %q" $mode) -}}
{{- end -}}
{{- end -}}

{{/* Environment for the NATS connection of one service: (dict "root" $ "service" "binder"). */}}
{{- define "gpu-fleet.natsEnv" -}}
{{- $root := .root -}}
{{- $nats := $root.Values.nats -}}
{{- $scheme := ternary "tls" "nats" (eq (include "gpu-fleet.natsTLS" $root) "true") -}}
{{- if $nats.credentialsSecret.name }}
- name: JOBTREE_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $nats.credentialsSecret.name }}
      key: {{ $nats.credentialsSecret.key }}
{{- else if $nats.bundled }}
- name: JOBTREE_NATS_URL
  value: {{ printf "%s://%s.%s.svc:4222" $scheme (include "gpu-fleet.natsName" $root) $root.Release.Namespace | quote }}
{{- else if $nats.url }}
- name: JOBTREE_NATS_URL
  value: {{ $nats.url | quote }}
{{- else }}
{{- fail "nats.bundled=false needs nats.url or nats.credentialsSecret.name" }}
{{- end }}
{{- if $nats.auth.enabled }}
- name: JOBTREE_NATS_USER
  value: {{ .service | quote }}
- name: JOBTREE_NATS_PASSWORD_FILE
  value: /etc/jobtree/nats-auth/password
{{- end }}
{{- if eq (include "gpu-fleet.natsTLS" $root) "true" }}
- name: JOBTREE_NATS_TLS_CA_FILE
  value: /etc/jobtree/nats-ca/ca.crt
{{- else if $nats.tls.caSecret }}
- name: JOBTREE_NATS_TLS_CA_FILE
  value: /etc/jobtree/nats-ca/{{ $nats.tls.caKey }}
{{- end }}
{{- end -}}

{{/* The engine settings (values `engine`), the same for every service (shared/bus/settings.py).
     `--set engine.spareFactor=0.5` passes a string, so the range is checked here. */}}
{{- define "gpu-fleet.engineEnv" -}}
{{- $engine := .Values.engine -}}
{{- $vars := dict "defaultDurationHours" "JOBTREE_DEFAULT_DURATION_HOURS" "spareFactor" "JOBTREE_SPARE_FACTOR" "conservativeLeadHours" "JOBTREE_CONSERVATIVE_LEAD_HOURS" "horizonDays" "JOBTREE_HORIZON_DAYS" "nodeGraceSeconds" "JOBTREE_NODE_GRACE_SECONDS" "missingPodGraceSeconds" "JOBTREE_MISSING_POD_GRACE_SECONDS" -}}
{{- range $key, $var := $vars }}
{{- $value := index $engine $key | toString }}
{{- $number := float64 $value }}
{{- if eq $key "spareFactor" }}
{{- if or (lt $number 0.0) (gt $number 1.0) }}
{{- fail (printf "engine.spareFactor must be between 0 and 1, not %s" $value) }}
{{- end }}
{{- else if le $number 0.0 }}
{{- fail (printf "engine.%s must be positive, not %s" $key $value) }}
{{- end }}
- name: {{ $var }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/*
OpenTelemetry trace export of one service container: (dict "root" $ "service" "binder").
Nothing unless tracing.otlpEndpoint is set (the services then export over OTLP/HTTP, see
shared/bus/tracing.py). The resource attributes refer to POD_NAME / POD_NAMESPACE, which the
container defines before this block.
*/}}
{{- define "gpu-fleet.tracingEnv" -}}
{{- $tracing := .root.Values.tracing -}}
{{- if $tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $tracing.otlpEndpoint | quote }}
{{- with $tracing.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- if ne ($tracing.samplerArg | toString) "" }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $tracing.samplerArg | toString | quote }}
{{- end }}
{{- $attributes := list "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(POD_NAME)" (printf "k8s.container.name=%s" .service) }}
{{- range $key, $value := $tracing.resourceAttributes }}
{{- $attributes = append $attributes (printf "%s=%v" $key $value) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attributes | quote }}
{{- if $tracing.headersSecret.name }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ $tracing.headersSecret.name }}
      key: {{ $tracing.headersSecret.key }}
{{- end }}
{{- end }}
{{- end -}}

{{- /* The pod policy settings admission and the binder both read (same values, same env). */}}
{{- define "gpu-fleet.podPolicyEnv" -}}
{{- $policy := .Values.podPolicy -}}
- name: JOBTREE_POD_POLICY_ALLOW
  value: {{ join "," $policy.allow | quote }}
- name: JOBTREE_POD_POLICY_CAPABILITIES
  value: {{ join "," $policy.capabilities | quote }}
- name: JOBTREE_POD_POLICY_SERVICE_ACCOUNTS
  value: {{ join "," $policy.serviceAccounts | quote }}
- name: JOBTREE_MAX_TEMPLATE_BYTES
  value: {{ $policy.maxTemplateBytes | int | quote }}
{{- end }}

{{/*
One service container: (dict "root" $ "service" "binder").
*/}}
{{- define "gpu-fleet.container" -}}
{{- $root := .root -}}
{{- $name := .service -}}
{{- $svc := index $root.Values.services $name -}}
- name: {{ $name }}
  image: {{ include "gpu-fleet.image" $root | quote }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["jobtree-{{ $name }}"]
  {{- with $svc.args }}
  args:
    {{- range . }}
    - {{ . | toString | quote }}
    {{- end }}
  {{- end }}
  env:
    {{- include "gpu-fleet.natsEnv" (dict "root" $root "service" $name) | trim | nindent 4 }}
    - name: JOBTREE_HTTP_HOST
      value: "0.0.0.0"
    - name: JOBTREE_HTTP_PORT
      value: {{ $svc.port | quote }}
    - name: JOBTREE_LOG_LEVEL
      value: {{ $root.Values.logLevel | quote }}
    - name: JOBTREE_LOG_FORMAT
      value: {{ $root.Values.logFormat | quote }}
    - name: JOBTREE_GPU_RESOURCE
      value: {{ $root.Values.gpuResource | quote }}
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    {{- include "gpu-fleet.engineEnv" $root | nindent 4 }}
    {{- include "gpu-fleet.tracingEnv" (dict "root" $root "service" $name) | nindent 4 }}
    {{- if or (eq $name "admission") (eq $name "binder") }}
    {{- include "gpu-fleet.podPolicyEnv" $root | nindent 4 }}
    {{- end }}
    {{- if eq $name "admission" }}
    {{- if $svc.defaultOwnerGlobs }}
    - name: JOBTREE_DEFAULT_OWNER_GLOBS
      value: {{ $svc.defaultOwnerGlobs | quote }}
    {{- end }}
    {{- if $root.Values.webhooks.enabled }}
    - name: JOBTREE_WEBHOOK_PORT
      value: {{ $root.Values.webhooks.port | quote }}
    - name: JOBTREE_TLS_CERT
      value: /etc/jobtree/webhook/tls.crt
    - name: JOBTREE_TLS_KEY
      value: /etc/jobtree/webhook/tls.key
    {{- end }}
    {{- end }}
    {{- if and (eq $name "binder") $root.Values.services.admission.defaultOwnerGlobs }}
    - name: JOBTREE_DEFAULT_OWNER_GLOBS
      value: {{ $root.Values.services.admission.defaultOwnerGlobs | quote }}
    {{- end }}
    {{- if eq $name "binder" }}
    - name: JOBTREE_LEADER_ELECT
      value: {{ $svc.leaderElect | quote }}
    - name: JOBTREE_LEADER_NAMESPACE
      value: {{ $root.Release.Namespace | quote }}
    - name: JOBTREE_HOLD_IMAGE
      value: {{ $svc.holdImage | quote }}
    {{- end }}
    {{- with $root.Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $svc.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: m-{{ $name }}
      containerPort: {{ $svc.port }}
      protocol: TCP
    {{- if and (eq $name "admission") $root.Values.webhooks.enabled }}
    - name: webhook
      containerPort: {{ $root.Values.webhooks.port }}
      protocol: TCP
    {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: m-{{ $name }}
    initialDelaySeconds: 10
    periodSeconds: 20
  readinessProbe:
    httpGet:
      path: /readyz
      port: m-{{ $name }}
    periodSeconds: 5
  {{- with $svc.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- if and (eq $name "admission") $root.Values.webhooks.enabled }}
    - name: webhook-tls
      mountPath: /etc/jobtree/webhook
      readOnly: true
    {{- end }}
    {{- if or (eq (include "gpu-fleet.natsTLS" $root) "true") $root.Values.nats.tls.caSecret }}
    - name: nats-ca
      mountPath: /etc/jobtree/nats-ca
      readOnly: true
    {{- end }}
    {{- if $root.Values.nats.auth.enabled }}
    - name: nats-auth-{{ $name }}
      mountPath: /etc/jobtree/nats-auth
      readOnly: true
    {{- end }}
    {{- if and (eq $root.Values.mode "combined") $root.Values.controllerManager.tokenPerService }}
    - name: token-{{ $name }}
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
    {{- end }}
{{- end -}}

{{/* Pod-level settings shared by both modes. */}}
{{- define "gpu-fleet.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Volumes a pod hosting `services` (a list) needs. */}}
{{- define "gpu-fleet.volumes" -}}
{{- $root := .root -}}
- name: tmp
  emptyDir: {}
{{- if and (has "admission" .services) $root.Values.webhooks.enabled }}
- name: webhook-tls
  secret:
    secretName: {{ include "gpu-fleet.webhookSecretName" $root }}
{{- end }}
{{- if and (eq (include "gpu-fleet.natsTLS" $root) "true") $root.Values.nats.tls.secret }}
- name: nats-ca
  secret:
    secretName: {{ $root.Values.nats.tls.secret }}
    items:
      - {key: ca.crt, path: ca.crt}
{{- else if eq (include "gpu-fleet.natsTLS" $root) "true" }}
- name: nats-ca
  configMap:
    name: {{ include "gpu-fleet.natsName" $root }}-ca
{{- else if $root.Values.nats.tls.caSecret }}
- name: nats-ca
  secret:
    secretName: {{ $root.Values.nats.tls.caSecret }}
{{- end }}
{{- if $root.Values.nats.auth.enabled }}
{{- range .services }}
- name: nats-auth-{{ . }}
  secret:
    secretName: {{ include "gpu-fleet.natsSecretName" (dict "root" $root "identity" .) }}
    defaultMode: 0400
    items:
      - {key: password, path: password}
{{- end }}
{{- end }}
{{- if and (eq $root.Values.mode "combined") $root.Values.controllerManager.tokenPerService }}
{{- range .services }}
- name: token-{{ . }}
  secret:
    secretName: {{ include "gpu-fleet.serviceAccountName" (dict "root" $root "service" .) }}-token
    items:
      - {key: token, path: token}
      - {key: ca.crt, path: ca.crt}
      - {key: namespace, path: namespace}
{{- end }}
{{- end }}
{{- end -}}

{{/* nats-server configuration of the bundled StatefulSet. */}}
{{- define "gpu-fleet.natsConfig" -}}
server_name: $POD_NAME
port: 4222
# monitoring only inside the pod (the probes exec into it)
http: 127.0.0.1:8222
pid_file: /tmp/nats-server.pid
max_payload: 4MB
lame_duck_duration: 30s
jetstream {
  store_dir: /data/jetstream
  max_memory_store: {{ .Values.nats.jetstream.maxMemoryStore }}
  max_file_store: {{ .Values.nats.jetstream.maxFileStore }}
}
{{- if eq (include "gpu-fleet.natsTLS" .) "true" }}
tls {
  cert_file: /etc/nats/tls/tls.crt
  key_file: /etc/nats/tls/tls.key
  timeout: 5
}
{{- end }}
# Users and permissions, generated by `jobtree-nats-auth` from the subject catalog (each
# password is read from the environment: the bcrypt hash in the identity's Secret).
{{ .Files.Get "files/nats-authorization.conf" }}
{{- end -}}
