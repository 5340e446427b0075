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
