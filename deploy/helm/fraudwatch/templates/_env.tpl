{{/* =========================================================================================================
Every environment variable the chart sets, per component, in one place (README.md, "Environment contract").
Names follow the settings classes (pydantic-settings, nested groups joined by "__"): rollout/settings.py
(FW_ROLLOUT_…), rollout/router/outcomes/settings.py (FW_ROLLOUT_OUTCOMES__…), service/settings.py (FW_…).
tests/unit/test_chart_render.py checks each name against those classes.

A component's `settings` map adds variables under its prefix; keys the chart sets here are refused.
========================================================================================================= */}}

{{/* (dict "env" (list (dict "name" … "value" …) …) "prefix" "FW_…__" "settings" map "extra" list
"reserved" list) → YAML list; "reserved": more settings keys the chart owns without setting them. */}}
{{- define "fraudwatch.env.render" -}}
{{- $env := .env }}
{{- $reserved := .reserved | default list }}
{{- range .env }}
{{- if hasPrefix $.prefix .name }}
{{- $key := trimPrefix $.prefix .name | lower }}
{{- $reserved = append $reserved $key }}
{{- $reserved = append $reserved (first (splitList "__" $key)) }}
{{- end }}
{{- end }}
{{- range $key, $value := .settings }}
{{- if has $key $reserved }}
{{- fail (printf "settings key %q: %s%s is set by the chart itself (see README.md, Environment contract)" $key $.prefix (upper $key)) }}
{{- end }}
{{- if not (regexMatch "^[a-z][a-z0-9_]*$" $key) }}
{{- fail (printf "settings key %q must be a snake_case pydantic field name (nested groups joined by __)" $key) }}
{{- end }}
{{- $text := toString $value }}
{{- if or (kindIs "slice" $value) (kindIs "map" $value) }}{{ $text = toJson $value }}{{ end }}
{{- $env = append $env (dict "name" (printf "%s%s" $.prefix (upper $key)) "value" $text) }}
{{- end }}
{{- toYaml (concat $env (.extra | default list)) }}
{{- end }}

{{- define "fraudwatch.env.fieldRef" -}}
{{- dict "fieldRef" (dict "fieldPath" .) | toYaml }}
{{- end }}

{{/* The rollout controller (rollout/settings.py: RolloutSettings, ControllerSettings). */}}
{{- define "fraudwatch.env.controller" -}}
{{- $c := .Values.controller }}
{{- $le := $c.leaderElection }}
{{- $p := "FW_ROLLOUT_CONTROLLER__" }}
{{- $kube := "FW_ROLLOUT_CONTROLLER__KUBE__" }}
{{- $env := list
  (dict "name" "FW_ROLLOUT_LOG_LEVEL" "value" .Values.logLevel)
  (dict "name" "FW_ROLLOUT_HOME" "value" (include "fraudwatch.dataDir" .))
  (dict "name" (print $p "BACKEND") "value" "kube")
  (dict "name" (print $p "NAME") "value" (include "fraudwatch.rolloutName" .))
  (dict "name" (print $p "PROMETHEUS_URL") "value" .Values.prometheus.url)
  (dict "name" (print $p "HOST") "value" "0.0.0.0")
  (dict "name" (print $p "METRICS_PORT") "value" (toString $c.metricsPort))
  (dict "name" (print $kube "NAMESPACE") "valueFrom" (include "fraudwatch.env.fieldRef" "metadata.namespace" | fromYaml))
  (dict "name" (print $kube "MODEL_SERVER_CONFIGMAP") "value" (include "fraudwatch.modelServerConfigMap" .))
  (dict "name" (print $kube "LEADER_ELECTION") "value" (toString $le.enabled))
  (dict "name" (print $kube "LEASE_NAME") "value" (include "fraudwatch.leaseName" .))
  (dict "name" (print $kube "LEASE_DURATION_S") "value" (toString $le.leaseDurationSeconds))
  (dict "name" (print $kube "RENEW_DEADLINE_S") "value" (toString $le.renewDeadlineSeconds))
  (dict "name" (print $kube "RETRY_PERIOD_S") "value" (toString $le.retryPeriodSeconds))
  (dict "name" (print $kube "IDENTITY") "valueFrom" (include "fraudwatch.env.fieldRef" "metadata.name" | fromYaml))
  (dict "name" (print $kube "ROUTER_SERVICE") "value" (include "fraudwatch.componentName" (dict "ctx" . "component" "router-feedback")))
  (dict "name" (print $kube "ROUTER_PORT_NAME") "value" "feedback")
  (dict "name" "FW_ROLLOUT_ROUTER__ADMIN_TOKEN_FILE" "value" (include "fraudwatch.adminTokenPath" .))
  (dict "name" (print $p "PROVIDER__READY_PATH") "value" .Values.prometheus.readyPath)
}}
{{- /* The metrics provider's headers and credentials (files of the mounted Secret, never values). */}}
{{- with .Values.prometheus.headers }}
{{- $env = append $env (dict "name" (print $p "PROVIDER__HEADERS") "value" (toJson .)) }}
{{- end }}
{{- with include "fraudwatch.providerAuth" . | fromYaml }}
{{- range .items }}
{{- $env = append $env (dict "name" (print $p "PROVIDER__" .env) "value" (printf "%s/%s" (include "fraudwatch.providerAuthDir" $) .path)) }}
{{- end }}
{{- if eq .kind "basic" }}
{{- $env = append $env (dict "name" (print $p "PROVIDER__BASIC_AUTH_USERNAME") "value" $.Values.prometheus.auth.basicAuthUsername) }}
{{- else if eq .kind "sigv4" }}
{{- $env = append $env (dict "name" (print $p "PROVIDER__SIGV4__REGION") "value" $.Values.prometheus.auth.sigv4.region) }}
{{- $env = append $env (dict "name" (print $p "PROVIDER__SIGV4__SERVICE") "value" (default "aps" $.Values.prometheus.auth.sigv4.service)) }}
{{- end }}
{{- end }}
{{- /* With a model registry: aliases move with the rollout and the quality stage can fetch bundles. */}}
{{- with .Values.mlflow.trackingUri }}
{{- $env = append $env (dict "name" "FW_MLFLOW_TRACKING_URI" "value" .) }}
{{- $env = append $env (dict "name" (print $kube "USE_REGISTRY") "value" "true") }}
{{- end }}
{{- include "fraudwatch.env.render" (dict "env" $env "prefix" $p "settings" $c.settings "extra" $c.extraEnv) }}
{{- end }}

{{/* The router (RouterSettings) and its prediction log (rollout/router/outcomes/settings.py: OutcomeSettings). */}}
{{- define "fraudwatch.env.router" -}}
{{- $r := .Values.router }}
{{- $p := "FW_ROLLOUT_ROUTER__" }}
{{- $outcomes := "FW_ROLLOUT_OUTCOMES__" }}
{{- /* SIGTERM → in-flight requests finish (graceful), queued shadow work drains, the prediction log is flushed
     (close): the three fit in the pod's grace period with 3 s to spare, so nothing answered is lost on a rollout. */}}
{{- $budget := max 3 (sub (int $r.terminationGracePeriodSeconds) 3) }}
{{- $drain := 2 }}
{{- $graceful := max 1 (div (sub $budget $drain) 2) }}
{{- $close := max 1 (sub (sub $budget $drain) $graceful) }}
{{- $env := list
  (dict "name" "FW_ROLLOUT_LOG_LEVEL" "value" .Values.logLevel)
  (dict "name" "FW_ROLLOUT_HOME" "value" (include "fraudwatch.dataDir" .))
  (dict "name" (print $p "HOST") "value" "0.0.0.0")
  (dict "name" (print $p "PORT") "value" (toString $r.port))
  (dict "name" (print $p "GRACEFUL_SHUTDOWN_S") "value" (toString $graceful))
  (dict "name" (print $p "SHADOW_DRAIN_TIMEOUT_S") "value" (toString $drain))
  (dict "name" (print $p "EXPOSE_DECISION_DETAILS") "value" (toString $r.exposeDecisionDetails))
  (dict "name" (print $p "ADMIN_TOKEN_FILE") "value" (include "fraudwatch.adminTokenPath" .))
  (dict "name" (print $p "CONTROL_PORT") "value" (toString $r.feedback.port))
  (dict "name" (print $p "FEEDBACK_TOKEN_FILE") "value" (include "fraudwatch.feedbackTokenPath" .))
  (dict "name" (print $p "FEEDBACK_SOURCE") "value" $r.feedback.token.source)
  (dict "name" (print $p "STICKY_KEY_FILE") "value" (include "fraudwatch.stickyKeyPath" .))
  (dict "name" (print $p "KUBE__NAMESPACE") "valueFrom" (include "fraudwatch.env.fieldRef" "metadata.namespace" | fromYaml))
  (dict "name" (print $p "KUBE__ROLLOUT_NAME") "value" (include "fraudwatch.rolloutName" .))
}}
{{- if $r.feedback.sourcesSecret }}
{{- $env = append $env (dict "name" (print $p "FEEDBACK_TOKENS_DIR") "value" (include "fraudwatch.feedbackSourcesPath" .)) }}
{{- end }}
{{- /* Recorded fraud labels go to the model servers' online store (none in embedded mode: each model server pod
     has its own file there, which the router cannot reach). */}}
{{- if ne .Values.onlineStore.mode "embedded" }}
{{- $env = append $env (dict "name" (print $p "ONLINE_STORE__URL") "value" (include "fraudwatch.onlineStoreUrl" .)) }}
{{- $env = append $env (dict "name" (print $p "ONLINE_STORE__PASSWORD_FILE") "value" (printf "%s/password" (include "fraudwatch.onlineStorePasswordDir" .))) }}
{{- $env = append $env (dict "name" (print $p "ONLINE_STORE__KEY_PREFIX") "value" .Values.onlineStore.keyPrefix) }}
{{- end }}
{{- $routerEnv := include "fraudwatch.env.render" (dict "env" $env "prefix" $p "settings" $r.settings "reserved" (list "feedback_tokens_dir")) | fromYamlArray }}
{{- /* The DSN (it may carry the database password) is a file of the mounted Secret, never an env variable. The
     prediction log's durable marks on the pod's data emptyDir: it outlives container restarts, so what a killed
     router never wrote is counted (dropped{reason="killed"}) by the container started after it. */}}
{{- $marks := print (include "fraudwatch.dataDir" .) "/prediction-log-marks" }}
{{- $logEnv := list (dict "name" (print $outcomes "DSN_FILE") "value" (include "fraudwatch.predictionLogPath" .)) (dict "name" (print $outcomes "CLOSE_TIMEOUT_S") "value" (toString $close)) (dict "name" (print $outcomes "MARK_DIR") "value" $marks) }}
{{- include "fraudwatch.env.render" (dict "env" (concat $routerEnv $logEnv) "prefix" $outcomes "settings" .Values.outcomes.settings "extra" $r.extraEnv "reserved" (list "dsn")) }}
{{- end }}

{{/* The model servers (service/settings.py: Settings, ServeSettings); the controller adds the version's env. */}}
{{- define "fraudwatch.env.modelServer" -}}
{{- $s := .Values.modelServer }}
{{- $p := "FW_SERVE__" }}
{{- $env := list
  (dict "name" "FW_LOG_LEVEL" "value" .Values.logLevel)
  (dict "name" "FW_HOME" "value" (include "fraudwatch.dataDir" .))
  (dict "name" (print $p "MODEL_NAME") "value" .Values.model.name)
}}
{{- with .Values.mlflow.trackingUri }}
{{- $env = append $env (dict "name" "FW_MLFLOW_TRACKING_URI" "value" .) }}
{{- end }}
{{- /* The online store: every version of a rollout reads and writes the same one. */}}
{{- $env = append $env (dict "name" (print $p "ONLINE_STORE__KEY_PREFIX") "value" .Values.onlineStore.keyPrefix) }}
{{- if ne .Values.onlineStore.mode "embedded" }}
{{- $env = append $env (dict "name" (print $p "ONLINE_STORE__URL") "value" (include "fraudwatch.onlineStoreUrl" .)) }}
{{- $env = append $env (dict "name" (print $p "ONLINE_STORE__PASSWORD_FILE") "value" (printf "%s/password" (include "fraudwatch.onlineStorePasswordDir" .))) }}
{{- end }}
{{- /* The feature log: every version writes the vectors it served to the shared volume (featureLog). */}}
{{- with .Values.featureLog }}
{{- if .enabled }}
{{- $env = concat $env (list
  (dict "name" "FW_FEATURE_LOG__ENABLED" "value" "true")
  (dict "name" "FW_FEATURE_LOG__DIRECTORY" "value" .mountPath)
  (dict "name" "FW_FEATURE_LOG__RETENTION_DAYS" "value" (toString .retentionDays))
  (dict "name" "FW_FEATURE_LOG__MAX_BYTES" "value" (toString (int64 .maxBytes)))
) }}
{{- end }}
{{- end }}
{{- /* Set per version by the controller: refused in modelServer.settings. */}}
{{- $byController := list (print $p "MODEL_URI") (print $p "MODEL_ALIAS") (print $p "MODEL_DIR") (print $p "MODEL_VERSION") }}
{{- range $name := $byController }}
{{- if hasKey $s.settings (trimPrefix $p $name | lower) }}
{{- fail (printf "modelServer.settings: %s is set per version by the controller" $name) }}
{{- end }}
{{- end }}
{{- include "fraudwatch.env.render" (dict "env" $env "prefix" $p "settings" $s.settings "extra" $s.extraEnv) }}
{{- end }}

{{/* Retraining: the CronJob and the webhook receiver (service/settings.py: Settings, RetrainSettings).
(dict "ctx" $ "webhook" true|false) */}}
{{- define "fraudwatch.env.retraining" -}}
{{- $root := .ctx }}
{{- $t := $root.Values.retraining }}
{{- $p := "FW_RETRAIN__" }}
{{- $env := list
  (dict "name" "FW_LOG_LEVEL" "value" $root.Values.logLevel)
  (dict "name" "FW_HOME" "value" (include "fraudwatch.dataDir" $root))
  (dict "name" "FW_REGISTERED_MODEL_NAME" "value" $root.Values.model.name)
}}
{{- with $root.Values.mlflow.trackingUri }}
{{- $env = append $env (dict "name" "FW_MLFLOW_TRACKING_URI" "value" .) }}
{{- end }}
{{- $env = concat $env (list
  (dict "name" (print $p "DATA_PATH") "value" $t.dataPath)
  (dict "name" (print $p "REGRESSION_SET") "value" $t.regressionSet)
  (dict "name" (print $p "WINDOW_DAYS") "value" (toString $t.windowDays))
  (dict "name" (print $p "HANDOFF") "value" $t.handoff)
) }}
{{- /* The retrain's source; the feature log's paths where its pod mounts them (the CronJob, or the webhook that
trains itself: runner subprocess). */}}
{{- $env = append $env (dict "name" (print $p "SOURCE") "value" $t.source) }}
{{- if and (include "fraudwatch.retrainFromLog" $root) (or (not .webhook) (eq $t.webhook.runner "subprocess")) }}
{{- $env = concat $env (list
  (dict "name" "FW_FEATURE_LOG__DIRECTORY" "value" $root.Values.featureLog.mountPath)
  (dict "name" (print $p "LABELS_DSN_FILE") "value" (include "fraudwatch.predictionLogPath" $root))
) }}
{{- end }}
{{- if eq $t.handoff "kube" }}
{{- $env = concat $env (list
  (dict "name" (print $p "KUBE__NAMESPACE") "valueFrom" (include "fraudwatch.env.fieldRef" "metadata.namespace" | fromYaml))
  (dict "name" (print $p "KUBE__ROLLOUT_NAME") "value" (include "fraudwatch.rolloutName" $root))
) }}
{{- with $t.candidateImage }}
{{- $env = append $env (dict "name" (print $p "KUBE__IMAGE") "value" .) }}
{{- end }}
{{- end }}
{{- if .webhook }}
{{- $w := $t.webhook }}
{{- $env = concat $env (list
  (dict "name" (print $p "WEBHOOK__HOST") "value" "0.0.0.0")
  (dict "name" (print $p "WEBHOOK__PORT") "value" (toString $w.port))
  (dict "name" (print $p "WEBHOOK__TOKEN_FILE") "value" (include "fraudwatch.retrainTokenPath" $root))
  (dict "name" (print $p "WEBHOOK__COOLDOWN_S") "value" (toString $w.cooldownSeconds))
  (dict "name" (print $p "WEBHOOK__STATE_FILE") "value" (printf "%s/webhook.json" (include "fraudwatch.retrainStateDir" $root)))
  (dict "name" (print $p "WEBHOOK__GRACEFUL_SHUTDOWN_S") "value" (toString (max 1 (sub (int $w.terminationGracePeriodSeconds) 5))))
  (dict "name" (print $p "WEBHOOK__RUNNER") "value" $w.runner)
) }}
{{- if eq $w.runner "job" }}
{{- $env = concat $env (list
  (dict "name" (print $p "WEBHOOK__JOB__NAMESPACE") "valueFrom" (include "fraudwatch.env.fieldRef" "metadata.namespace" | fromYaml))
  (dict "name" (print $p "WEBHOOK__JOB__CRONJOB") "value" (include "fraudwatch.retrainingName" $root))
  (dict "name" (print $p "WEBHOOK__JOB__POLL_S") "value" (toString $w.jobPollSeconds))
) }}
{{- end }}
{{- end }}
{{- include "fraudwatch.env.render" (dict "env" $env "prefix" $p "settings" $t.settings "extra" $t.extraEnv) }}
{{- end }}
