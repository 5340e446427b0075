{{/* ---------------------------------------------------------------------------------------------------------
Retraining (retraining-*.yaml): names, paths and the pod parts the CronJob and the webhook share.
--------------------------------------------------------------------------------------------------------- */}}

{{- define "fraudwatch.retrainingName" -}}
{{- include "fraudwatch.componentName" (dict "ctx" . "component" "retraining") }}
{{- end }}

{{- define "fraudwatch.retrainWebhookName" -}}
{{- include "fraudwatch.componentName" (dict "ctx" . "component" "retraining-webhook") }}
{{- end }}

{{- define "fraudwatch.retrainWebhookJobs" -}}
{{- if and .Values.retraining.webhook.enabled (eq .Values.retraining.webhook.runner "job") }}true{{ end }}
{{- end }}

{{/* The CronJob renders for the schedule, or (suspended) as the template of the webhook's Jobs. */}}
{{- define "fraudwatch.retrainCronJob" -}}
{{- if or .Values.retraining.enabled (include "fraudwatch.retrainWebhookJobs" .) }}true{{ end }}
{{- end }}

{{- define "fraudwatch.retrainTokenSecret" -}}
{{- default (include "fraudwatch.retrainWebhookName" .) .Values.retraining.webhook.token.existingSecret }}
{{- end }}

{{- define "fraudwatch.retrainTokenKey" -}}
{{- if .Values.retraining.webhook.token.existingSecret }}{{ .Values.retraining.webhook.token.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* Where the webhook reads its bearer token (a Secret volume; FW_RETRAIN__WEBHOOK__TOKEN_FILE). */}}
{{- define "fraudwatch.retrainTokenPath" -}}
/etc/fraudwatch/retrain-webhook/token
{{- end }}

{{/* The webhook's ledger directory (FW_RETRAIN__WEBHOOK__STATE_FILE lives in it). */}}
{{- define "fraudwatch.retrainStateDir" -}}
/var/lib/fraudwatch-retrain
{{- end }}

{{/* The retraining image: retraining.image, or the controller image when its repository is empty. */}}
{{- define "fraudwatch.retrainingImage" -}}
{{- $t := .Values.retraining }}
{{- $image := $t.image }}
{{- if not $image.repository }}
{{- $image = dict "repository" .Values.controller.image.repository "tag" (default .Values.controller.image.tag $t.image.tag) "pullPolicy" $t.image.pullPolicy }}
{{- end }}
{{- include "fraudwatch.image" (dict "image" $image "default" .Chart.AppVersion) }}
{{- end }}

{{/* The API token is mounted only where the hand-off patches the ModelRollout. */}}
{{- define "fraudwatch.retrainingAutomount" -}}
{{- if eq .Values.retraining.handoff "kube" }}true{{ else }}false{{ end }}
{{- end }}

{{/* Pod-spec lines both retraining pods share (nindent them under `spec:`); (dict "ctx" $ "webhook" true|false).
The webhook that creates Jobs runs as its own ServiceAccount (it patches no ModelRollout: the Job does). */}}
{{- define "fraudwatch.retrainingPodBase" -}}
{{- $jobs := and .webhook (include "fraudwatch.retrainWebhookJobs" .ctx) }}
{{- with .ctx }}
{{- if $jobs }}
serviceAccountName: {{ include "fraudwatch.retrainWebhookName" . }}
automountServiceAccountToken: true
{{- else }}
serviceAccountName: {{ include "fraudwatch.retrainingName" . }}
automountServiceAccountToken: {{ include "fraudwatch.retrainingAutomount" . }}
{{- end }}
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "fraudwatch.podSecurityContext" . | nindent 2 }}
{{- with .Values.retraining.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.retraining.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.retraining.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------------
The feature log (featureLog): the volume every model server writes and the retrain Jobs read.
--------------------------------------------------------------------------------------------------------- */}}

{{- define "fraudwatch.featureLogClaim" -}}
{{- default (include "fraudwatch.componentName" (dict "ctx" . "component" "feature-log")) .Values.featureLog.existingClaim }}
{{- end }}

{{/* The `feature-log` volume (nindent under `volumes:`). */}}
{{- define "fraudwatch.featureLogVolume" -}}
- name: feature-log
  persistentVolumeClaim:
    claimName: {{ include "fraudwatch.featureLogClaim" . }}
{{- end }}

{{/* Whether the retrain trains on the feature log; refuses a configuration it could not run with. */}}
{{- define "fraudwatch.retrainFromLog" -}}
{{- if eq .Values.retraining.source "feature_log" }}
{{- if not .Values.featureLog.enabled }}
{{- fail "retraining.source feature_log needs featureLog.enabled: true (the model servers write the vectors it trains on)" }}
{{- end }}
{{- if not (or .Values.predictionLog.existingSecret .Values.predictionLog.dsn) }}
{{- fail "retraining.source feature_log reads the labels from the prediction log: set predictionLog.dsn or predictionLog.existingSecret (the default SQLite file lives on each router pod, out of the Job's reach)" }}
{{- end }}
{{- "true" }}
{{- end }}
{{- end }}

{{/* The retrain container's mounts of its data (nindent under `volumeMounts:`); empty for the stream source. */}}
{{- define "fraudwatch.retrainDataMounts" -}}
{{- if include "fraudwatch.retrainFromLog" . }}
- name: feature-log
  mountPath: {{ .Values.featureLog.mountPath }}
  readOnly: true
- name: prediction-log
  mountPath: {{ dir (include "fraudwatch.predictionLogPath" .) }}
  readOnly: true
{{- end }}
{{- end }}

{{/* ... and their volumes (nindent under `volumes:`). */}}
{{- define "fraudwatch.retrainDataVolumes" -}}
{{- if include "fraudwatch.retrainFromLog" . }}
{{ include "fraudwatch.featureLogVolume" . }}
- name: prediction-log
  secret:
    secretName: {{ include "fraudwatch.predictionLogSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ include "fraudwatch.predictionLogKey" . }}
        path: {{ base (include "fraudwatch.predictionLogPath" .) }}
{{- end }}
{{- end }}

{{/* Egress to the prediction-log database where a retrain reads its labels (nindent under `egress:`). */}}
{{- define "fraudwatch.retrainLabelsEgress" -}}
{{- if include "fraudwatch.retrainFromLog" . }}
{{- with .Values.predictionLog.ports }}
# The prediction-log database: the labels a retrain from the feature log joins.
- ports:
    {{- range . }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- end }}
{{- end }}
