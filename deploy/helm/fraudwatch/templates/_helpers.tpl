{{/* ---------------------------------------------------------------------------------------------------------
Names
--------------------------------------------------------------------------------------------------------- */}}

{{- define "fraudwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name, at most 63 characters (a DNS-1123 label). */}}
{{- define "fraudwatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", the suffix kept whole: the full name is cut to make room. */}}
{{- define "fraudwatch.componentName" -}}
{{- $suffix := .component }}
{{- $base := include "fraudwatch.fullname" .ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{- define "fraudwatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fraudwatch.rolloutName" -}}
{{- default (include "fraudwatch.fullname" .) .Values.rollout.name }}
{{- end }}

{{- define "fraudwatch.leaseName" -}}
{{- default (include "fraudwatch.componentName" (dict "ctx" . "component" "controller")) .Values.controller.leaderElection.leaseName }}
{{- end }}

{{- define "fraudwatch.modelServerConfigMap" -}}
{{- include "fraudwatch.componentName" (dict "ctx" . "component" "model-server") }}
{{- end }}

{{- define "fraudwatch.predictionLogSecret" -}}
{{- default (include "fraudwatch.componentName" (dict "ctx" . "component" "prediction-log")) .Values.predictionLog.existingSecret }}
{{- end }}

{{/* Where the router reads the prediction log's DSN (a Secret volume; FW_ROLLOUT_OUTCOMES__DSN_FILE). */}}
{{- define "fraudwatch.predictionLogPath" -}}
/etc/fraudwatch/prediction-log/dsn
{{- end }}

{{- define "fraudwatch.adminTokenSecret" -}}
{{- default (include "fraudwatch.componentName" (dict "ctx" . "component" "router-admin")) .Values.router.adminToken.existingSecret }}
{{- end }}

{{- define "fraudwatch.adminTokenKey" -}}
{{- if .Values.router.adminToken.existingSecret }}{{ .Values.router.adminToken.existingSecretKey }}{{ else }}admin-token{{ end }}
{{- end }}

{{/* Where the router reads its admin token (a Secret volume; FW_ROLLOUT_ROUTER__ADMIN_TOKEN_FILE). */}}
{{- define "fraudwatch.adminTokenPath" -}}
/etc/fraudwatch/admin/token
{{- end }}

{{/* The controller's metrics-provider credentials (prometheus.auth): the Secret's one key, mounted as this file. */}}
{{- define "fraudwatch.providerAuthDir" -}}
/etc/fraudwatch/metrics-provider
{{- end }}

{{- /* The kind of prometheus.auth and the Secret's keys it mounts: {kind, items: [{key, path, env}]}, env being the
provider setting (FW_ROLLOUT_CONTROLLER__PROVIDER__…) that names the file. SigV4 without existingSecret mounts
nothing: the controller reads the standard AWS_* variables (controller.extraEnv). */}}
{{- define "fraudwatch.providerAuth" -}}
{{- $a := .Values.prometheus.auth }}
{{- $s := $a.sigv4 | default dict }}
{{- $sigv4Keys := or $s.accessKeyIdKey $s.secretAccessKeyKey $s.sessionTokenKey }}
{{- if $s.region }}
{{- if or $a.bearerTokenKey $a.basicAuthPasswordKey $a.basicAuthUsername }}
{{- fail "prometheus.auth: sigv4 and bearer/basic auth are exclusive; set one" }}
{{- else if $a.existingSecret }}
{{- if not (and $s.accessKeyIdKey $s.secretAccessKeyKey) }}
{{- fail "prometheus.auth.sigv4: with existingSecret set accessKeyIdKey and secretAccessKeyKey" }}
{{- end }}
{{- $items := list (dict "key" $s.accessKeyIdKey "path" "access-key-id" "env" "SIGV4__ACCESS_KEY_ID_FILE") (dict "key" $s.secretAccessKeyKey "path" "secret-access-key" "env" "SIGV4__SECRET_ACCESS_KEY_FILE") }}
{{- if $s.sessionTokenKey }}
{{- $items = append $items (dict "key" $s.sessionTokenKey "path" "session-token" "env" "SIGV4__SESSION_TOKEN_FILE") }}
{{- end }}
{{- dict "kind" "sigv4" "items" $items | toYaml }}
{{- else if $sigv4Keys }}
{{- fail "prometheus.auth.sigv4: the keys need prometheus.auth.existingSecret (credentials never go in values)" }}
{{- else }}
{{- dict "kind" "sigv4" "items" (list) | toYaml }}
{{- end }}
{{- else if $sigv4Keys }}
{{- fail "prometheus.auth.sigv4: the keys need prometheus.auth.sigv4.region" }}
{{- else if $a.existingSecret }}
{{- if and $a.bearerTokenKey $a.basicAuthPasswordKey }}
{{- fail "prometheus.auth: set bearerTokenKey or basicAuthPasswordKey, not both" }}
{{- else if $a.bearerTokenKey }}
{{- dict "kind" "bearer" "items" (list (dict "key" $a.bearerTokenKey "path" "bearer-token" "env" "BEARER_TOKEN_FILE")) | toYaml }}
{{- else if and $a.basicAuthPasswordKey $a.basicAuthUsername }}
{{- dict "kind" "basic" "items" (list (dict "key" $a.basicAuthPasswordKey "path" "basic-password" "env" "BASIC_AUTH_PASSWORD_FILE")) | toYaml }}
{{- else }}
{{- fail "prometheus.auth.existingSecret: set bearerTokenKey, or basicAuthUsername and basicAuthPasswordKey, or sigv4" }}
{{- end }}
{{- else if or $a.bearerTokenKey $a.basicAuthPasswordKey $a.basicAuthUsername }}
{{- fail "prometheus.auth: the keys need prometheus.auth.existingSecret (credentials never go in values)" }}
{{- end }}
{{- end }}

{{- define "fraudwatch.feedbackTokenSecret" -}}
{{- default (include "fraudwatch.componentName" (dict "ctx" . "component" "router-feedback")) .Values.router.feedback.token.existingSecret }}
{{- end }}

{{- define "fraudwatch.feedbackTokenKey" -}}
{{- if .Values.router.feedback.token.existingSecret }}{{ .Values.router.feedback.token.existingSecretKey }}{{ else }}feedback-token{{ end }}
{{- end }}

{{/* Where the router reads the label feed's token (a Secret volume; FW_ROLLOUT_ROUTER__FEEDBACK_TOKEN_FILE). */}}
{{- define "fraudwatch.feedbackTokenPath" -}}
/etc/fraudwatch/feedback/token
{{- end }}

{{/* Where the router reads one token per label source (router.feedback.sourcesSecret as a volume, a file per key;
FW_ROLLOUT_ROUTER__FEEDBACK_TOKENS_DIR). */}}
{{- define "fraudwatch.feedbackSourcesPath" -}}
/etc/fraudwatch/feedback-sources
{{- end }}

{{- define "fraudwatch.stickyKeySecret" -}}
{{- default (include "fraudwatch.componentName" (dict "ctx" . "component" "router-sticky")) .Values.router.stickyKey.existingSecret }}
{{- end }}

{{- define "fraudwatch.stickyKeyKey" -}}
{{- if .Values.router.stickyKey.existingSecret }}{{ .Values.router.stickyKey.existingSecretKey }}{{ else }}sticky-key{{ end }}
{{- end }}

{{/* Where the router reads its sticky-assignment key (a Secret volume; FW_ROLLOUT_ROUTER__STICKY_KEY_FILE). */}}
{{- define "fraudwatch.stickyKeyPath" -}}
/etc/fraudwatch/sticky/key
{{- end }}

{{/*
A Secret holding one generated credential: (dict "ctx" $ "name" … "key" … "value" … "labels" (dict "ctx" $ "component"
…)). A given value is used as it is. Else, with `secrets.seed`, the value is derived from the seed, the namespace, the
Secret's name and key — the same on every render (GitOps tools that render with `helm template` see no change) and
unguessable without the seed: sha256(seed ‖ sha256(seed ‖ label)), nested so that no output helps compute another.
Without a seed it is generated once (randAlphaNum 48) and an upgrade keeps the live Secret's value (lookup; empty in
`helm template`, so every dry render shows a fresh one).
*/}}
{{- define "fraudwatch.generatedValue" -}}
{{- $seed := .ctx.Values.secrets.seed }}
{{- if .value }}
{{- .value }}
{{- else if $seed }}
{{- $label := printf "fraudwatch-credential/v1\n%s\n%s\n%s" .ctx.Release.Namespace .name .key }}
{{- sha256sum (printf "%s\n%s" $seed (sha256sum (printf "%s\n%s" $seed $label))) }}
{{- else }}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $live $live.data (index $live.data .key) }}
{{- index $live.data .key | b64dec }}
{{- else }}
{{- randAlphaNum 48 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fraudwatch.generatedSecret" -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ .name }}
  labels:
    {{- include "fraudwatch.labels" .labels | nindent 4 }}
type: Opaque
data:
  {{ .key }}: {{ include "fraudwatch.generatedValue" . | b64enc | quote }}
{{- end }}

{{- define "fraudwatch.predictionLogKey" -}}
{{- if .Values.predictionLog.existingSecret }}{{ .Values.predictionLog.existingSecretKey }}{{ else }}dsn{{ end }}
{{- end }}

{{/* The service account of a component: (dict "ctx" $ "component" "router" "values" .Values.router). */}}
{{- define "fraudwatch.serviceAccountName" -}}
{{- if .values.serviceAccount.create }}
{{- default (include "fraudwatch.componentName" (dict "ctx" .ctx "component" .component)) .values.serviceAccount.name }}
{{- else }}
{{- default "default" .values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------
Labels: (dict "ctx" $ "component" "router")
--------------------------------------------------------------------------------------------------------- */}}

{{- define "fraudwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fraudwatch.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "fraudwatch.labels" -}}
helm.sh/chart: {{ include "fraudwatch.chart" .ctx }}
{{ include "fraudwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fraudwatch
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------
Images
--------------------------------------------------------------------------------------------------------- */}}

{{/* (dict "image" .Values.router.image "default" .Chart.AppVersion) */}}
{{- define "fraudwatch.image" -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag | toString) }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------
Security contexts and scratch volumes
--------------------------------------------------------------------------------------------------------- */}}
{{- define "fraudwatch.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "fraudwatch.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* The writable emptyDirs every container gets: /tmp and the data dir (FW_HOME / FW_ROLLOUT_HOME). */}}
{{- define "fraudwatch.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratchSizeLimit }}
- name: data
  emptyDir:
    sizeLimit: {{ .Values.scratchSizeLimit }}
{{- end }}

{{- define "fraudwatch.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: {{ include "fraudwatch.dataDir" . }}
{{- end }}

{{- define "fraudwatch.dataDir" -}}
/var/lib/fraudwatch
{{- end }}

{{/* Prometheus scrape annotations: (dict "ctx" $ "port" 9090 "path" "/metrics") */}}
{{- define "fraudwatch.scrapeAnnotations" -}}
{{- if .ctx.Values.monitoring.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: {{ .path | quote }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------
Prometheus Operator: rendered when forced on, or when unset (null) and the cluster serves monitoring.coreos.com/v1.
--------------------------------------------------------------------------------------------------------- */}}
{{- define "fraudwatch.prometheusOperator" -}}
{{- $forced := .Values.monitoring.prometheusOperator }}
{{- if kindIs "invalid" $forced }}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- else if $forced }}true{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------
The ModelRollout's version specs
--------------------------------------------------------------------------------------------------------- */}}
{{/* (dict "version" "v2" "repository" "…" "tag" "" "pullPolicy" "…" "modelUri" "" "registryAlias" "" "replicas" 2 "resources" (dict)) */}}
{{- define "fraudwatch.versionSpec" -}}
{{- if and .modelUri .registryAlias }}
{{- fail (printf "model version %s: set at most one of modelUri and registryAlias" .version) }}
{{- end -}}
version: {{ .version | quote }}
image: {{ printf "%s:%s" .repository (default .version .tag | toString) | quote }}
imagePullPolicy: {{ .pullPolicy }}
{{- with .modelUri }}
modelUri: {{ . | quote }}
{{- end }}
{{- with .registryAlias }}
registryAlias: {{ . | quote }}
{{- end }}
replicas: {{ .replicas }}
{{- with .resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------
NetworkPolicy peers
--------------------------------------------------------------------------------------------------------- */}}
{{- define "fraudwatch.np.prometheusPeer" -}}
- namespaceSelector:
    {{- toYaml .Values.prometheus.namespaceSelector | nindent 4 }}
  podSelector:
    {{- toYaml .Values.prometheus.podSelector | nindent 4 }}
{{- end }}
{{- define "fraudwatch.np.dnsEgress" -}}
- to:
    - namespaceSelector:
        {{- toYaml .Values.networkPolicy.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.networkPolicy.dns.podSelector | nindent 8 }}
  ports:
    {{- range .Values.networkPolicy.dns.ports }}
    - port: {{ . }}
      protocol: UDP
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{/* Egress to the API server: networkPolicy.apiServer.cidrs, else the `kubernetes` EndpointSlice's addresses (one
/32 each, looked up at install/upgrade). Neither (a dry render — `helm template`, what GitOps tools run — or a cluster
that publishes no slice) fails the render: the old fallback, 0.0.0.0/0 on the API server's ports, let every pod of
the release reach any address on 443/6443. */}}
{{- define "fraudwatch.np.apiServerEgress" -}}
{{- $cidrs := .Values.networkPolicy.apiServer.cidrs }}
{{- if not $cidrs }}
{{- $slice := lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "kubernetes" }}
{{- range ($slice.endpoints | default list) }}
{{- range (.addresses | default list) }}
{{- $cidrs = append $cidrs (printf "%s/32" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $cidrs }}
{{- fail "networkPolicy.apiServer.cidrs is empty and the `kubernetes` EndpointSlice could not be looked up (helm template, a GitOps render, or a cluster without it): set networkPolicy.apiServer.cidrs to the API server's addresses (kubectl get endpointslice kubernetes -n default), or networkPolicy.egress=false" }}
{{- end }}
- to:
    {{- range $cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}

{{/* Labels of the model servers the controller creates (managed by the controller, not by Helm); the controller
adds fraudwatch.io/rollout, fraudwatch.io/version and app.kubernetes.io/version (the model version). */}}
{{- define "fraudwatch.modelServerLabels" -}}
{{ include "fraudwatch.selectorLabels" (dict "ctx" . "component" "model-server") }}
app.kubernetes.io/part-of: fraudwatch
app.kubernetes.io/managed-by: fraudwatch-controller
fraudwatch.io/model: {{ .Values.model.name | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------
The online store (Redis): names, the password Secret, what the model servers get
--------------------------------------------------------------------------------------------------------- */}}
{{- define "fraudwatch.onlineStoreName" -}}
{{- include "fraudwatch.componentName" (dict "ctx" . "component" "online-store") }}
{{- end }}

{{- define "fraudwatch.onlineStoreSecret" -}}
{{- default (printf "%s-auth" (include "fraudwatch.onlineStoreName" .)) .Values.onlineStore.auth.existingSecret }}
{{- end }}

{{- define "fraudwatch.onlineStoreSecretKey" -}}
{{- if .Values.onlineStore.auth.existingSecret }}{{ .Values.onlineStore.auth.existingSecretKey }}{{ else }}password{{ end }}
{{- end }}

{{- define "fraudwatch.onlineStorePasswordDir" -}}
/var/run/fraudwatch/online-store
{{- end }}

{{/* The URL the model servers use: "" for embedded (service default: a SQLite file under FW_HOME). */}}
{{- define "fraudwatch.onlineStoreUrl" -}}
{{- $o := .Values.onlineStore }}
{{- if eq $o.mode "deploy" }}
{{- printf "redis://%s:%d/0" (include "fraudwatch.onlineStoreName" .) (int $o.redis.port) }}
{{- else if eq $o.mode "existing" }}
{{- $o.url }}
{{- end }}
{{- end }}

{{/* Redis's ACL for the model servers' user (the password added at start as its sha256): the store's keys only, the
commands the store sends (service/data/online_redis.py), nothing dangerous (no CONFIG, FLUSHALL, KEYS, DEBUG...). */}}
{{- define "fraudwatch.onlineStoreAcl" -}}
resetchannels ~{{ .Values.onlineStore.keyPrefix }}* -@all +ping +multi +exec +discard +evalsha +eval +script|load +script|exists +get +set +incr +hmget +hset +hdel +hkeys +hincrby +pexpire +zadd +zcount +zscore +zremrangebyscore
{{- end }}
