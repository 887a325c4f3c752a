{{/*
Names, labels and the pieces several templates share. Everything that more
than one template needs is defined once here.
*/}}

{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Object names, one per component. */}}
{{- define "herald.gatewayName" -}}
{{- default (printf "%s-gateway" (include "herald.fullname" .)) .Values.gateway.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "herald.operatorName" -}}
{{- printf "%s-operator" (include "herald.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "herald.peeringName" -}}
{{- default (include "herald.operatorName" .) .Values.operator.peeringName -}}
{{- end -}}
{{- define "herald.redisName" -}}
{{- printf "%s-redis" (include "herald.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "herald.authSecretName" -}}
{{- printf "%s-auth" (include "herald.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "herald.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "herald.operatorName" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}
{{- define "herald.gatewayServiceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "herald.gatewayName" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select a component's pods: stable across upgrades. */}}
{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every object's labels. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "herald.labels" -}}
helm.sh/chart: {{ include "herald.chart" .root }}
{{ include "herald.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: herald
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The label that finds gateway pods whoever made them (the chart's plain
Deployment or the operator): NetworkPolicy, ServiceMonitor and test use it.
*/}}
{{- define "herald.gatewayPodLabel" -}}
herald.io/gateway: {{ include "herald.gatewayName" . }}
{{- end -}}

{{/* An image reference: [registry/]repository(@digest|:tag). Call with (dict "image" X "tag" DEFAULT). */}}
{{- define "herald.imageRef" -}}
{{- $repo := .image.repository -}}
{{- with .image.registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .tag .image.tag) -}}
{{- end -}}
{{- end -}}
{{- define "herald.image" -}}
{{- include "herald.imageRef" (dict "image" .Values.image "tag" .Chart.AppVersion) -}}
{{- end -}}
{{- define "herald.redisImage" -}}
{{- include "herald.imageRef" (dict "image" .Values.redis.image "tag" "7.2-alpine") -}}
{{- end -}}

{{/* The bundled Redis password, for redis-server (REDIS_PASSWORD) and redis-cli (REDISCLI_AUTH). */}}
{{- define "herald.redisPasswordEnv" -}}
{{- range $var := list "REDIS_PASSWORD" "REDISCLI_AUTH" }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ include "herald.redisPasswordSecretName" $ }}
      key: {{ include "herald.redisPasswordSecretKey" $ }}
{{- end }}
{{- end -}}

{{/*
Spread a component's pods over zones and hosts. `whenUnsatisfiable:
ScheduleAnyway` by default, so a one-zone or one-node cluster still schedules
them; `matchLabelKeys: [pod-template-hash]` counts each Deployment revision on
its own, so a rolling update spreads the new pods too. A non-empty `custom`
list (the user's own constraints) replaces it. Call with
(dict "spread" VALUES "custom" LIST "labels" SELECTOR-LABELS-YAML).
*/}}
{{- define "herald.topologySpread" -}}
{{- if .custom -}}
{{ toYaml .custom }}
{{- else if .spread.enabled -}}
{{- range $key := list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
- maxSkew: {{ $.spread.maxSkew }}
  topologyKey: {{ $key }}
  whenUnsatisfiable: {{ $.spread.whenUnsatisfiable }}
  labelSelector:
    matchLabels:
      {{- $.labels | nindent 6 }}
  {{- if $.revisions }}
  matchLabelKeys: [pod-template-hash]
  {{- end }}
{{- end }}
{{- end -}}
{{- end -}}

{{- define "herald.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}
{{- define "herald.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/*
A Secret value generated once: reuse what the cluster already holds (so an
upgrade never rotates it), else the value given, else a random one.
Call with (dict "root" $ "secret" NAME "key" KEY "value" GIVEN).
`helm template` and `--dry-run` cannot look up, so they show a fresh random value.
*/}}
{{- define "herald.keptSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if .value -}}
{{- .value -}}
{{- else if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 40 -}}
{{- end -}}
{{- end -}}

{{/*
Where the Redis URL lives (a Secret name and key): the chart's Redis Secret,
or the user's (bundled Redis with `redis.existingSecret`: its `redis-url` key;
external Redis with `redis.external.existingSecret`: the key named).
*/}}
{{- define "herald.redisUrlSecretName" -}}
{{- if and .Values.redis.enabled .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecret -}}
{{- else if and (not .Values.redis.enabled) .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- include "herald.redisName" . -}}
{{- end -}}
{{- end -}}
{{- define "herald.redisUrlSecretKey" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecretKey -}}
{{- else -}}
redis-url
{{- end -}}
{{- end -}}
{{- define "herald.redisPasswordSecretName" -}}
{{- default (include "herald.redisName" .) .Values.redis.existingSecret -}}
{{- end -}}
{{- define "herald.redisPasswordSecretKey" -}}
{{- ternary .Values.redis.existingSecretPasswordKey "redis-password" (ne .Values.redis.existingSecret "") -}}
{{- end -}}

{{/* JWT mode: secret (HS256), publicKey, or jwks. */}}
{{- define "herald.jwtMode" -}}
{{- if .Values.auth.jwt.jwksUrl -}}
jwks
{{- else if or .Values.auth.jwt.publicKey (and .Values.auth.jwt.existingSecret (eq .Values.auth.jwt.existingSecretHolds "publicKey")) -}}
publicKey
{{- else -}}
secret
{{- end -}}
{{- end -}}
{{- define "herald.jwtSecretName" -}}
{{- default (include "herald.authSecretName" .) .Values.auth.jwt.existingSecret -}}
{{- end -}}
{{- define "herald.jwtSecretKey" -}}
{{- if .Values.auth.jwt.existingSecret -}}
{{- .Values.auth.jwt.existingSecretKey -}}
{{- else if eq (include "herald.jwtMode" .) "publicKey" -}}
jwt-public-key
{{- else -}}
jwt-secret
{{- end -}}
{{- end -}}
{{- define "herald.apiKeySecretName" -}}
{{- default (include "herald.authSecretName" .) .Values.auth.apiKey.existingSecret -}}
{{- end -}}
{{- define "herald.apiKeySecretKey" -}}
{{- if .Values.auth.apiKey.existingSecret -}}
{{- .Values.auth.apiKey.existingSecretKey -}}
{{- else -}}
api-key
{{- end -}}
{{- end -}}

{{/* The Redis URL as an env var read from its Secret. */}}
{{- define "herald.redisUrlEnv" -}}
- name: HERALD_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "herald.redisUrlSecretName" . }}
      key: {{ include "herald.redisUrlSecretKey" . }}
{{- end -}}

{{/* OTEL_* pass-through, plus a service name per component. Call with (dict "root" $ "service" NAME). */}}
{{- define "herald.otelEnv" -}}
{{- $otel := .root.Values.otel -}}
{{- if not (hasKey $otel "OTEL_SERVICE_NAME") }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
{{- end }}
{{- range $name := keys $otel | sortAlpha }}
- name: {{ $name }}
  value: {{ index $otel $name | toString | quote }}
{{- end }}
{{- end -}}

{{/*
The gateway settings that the RealtimeGateway has no field for: passed as its
`env`, and used by the plain Deployment too, so both run the same configuration.
Call with (dict "root" $ "operatorDefaults" BOOL).
*/}}
{{- define "herald.gatewaySettingsEnv" -}}
{{- $r := .root }}
{{- /* The operator sets HERALD_ENV=production and HERALD_DEMO=false: repeat them only to differ. */}}
{{- if or (not .operatorDefaults) (ne $r.Values.gateway.env "production") }}
- name: HERALD_ENV
  value: {{ $r.Values.gateway.env | quote }}
{{- end }}
{{- if or (not .operatorDefaults) $r.Values.gateway.demo }}
- name: HERALD_DEMO
  value: {{ $r.Values.gateway.demo | quote }}
{{- end }}
- name: HERALD_LOG_LEVEL
  value: {{ $r.Values.gateway.logLevel | quote }}
- name: HERALD_HEARTBEAT
  value: {{ $r.Values.gateway.heartbeatSeconds | quote }}
{{- with $r.Values.gateway.allowedOrigins }}
- name: HERALD_ALLOWED_ORIGINS
  value: {{ join "," . | quote }}
{{- end }}
{{- with $r.Values.gateway.trustedProxies }}
- name: HERALD_TRUSTED_PROXIES
  value: {{ join "," . | quote }}
{{- end }}
{{- with $r.Values.auth.jwt.algorithms }}
- name: HERALD_JWT_ALGORITHMS
  value: {{ join "," . | quote }}
{{- end }}
{{- with $r.Values.auth.jwt.audience }}
- name: HERALD_JWT_AUDIENCE
  value: {{ . | quote }}
{{- end }}
{{- with $r.Values.auth.jwt.issuer }}
- name: HERALD_JWT_ISSUER
  value: {{ . | quote }}
{{- end }}
{{- include "herald.otelEnv" (dict "root" $r "service" "herald-gateway") }}
{{- with $r.Values.gateway.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
What the operator sets itself from the RealtimeGateway's fields (node id,
port, drain, Redis, JWT, API key): the plain Deployment sets it here.
*/}}
{{- define "herald.gatewayOwnEnv" -}}
- name: HERALD_NODE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: HERALD_PORT
  value: "8080"
- name: HERALD_DRAIN_SECONDS
  value: {{ .Values.gateway.drainSeconds | quote }}
- name: HERALD_REDIS_PREFIX
  value: {{ .Values.redis.prefix | quote }}
{{ include "herald.redisUrlEnv" . }}
{{- $mode := include "herald.jwtMode" . }}
{{- if eq $mode "jwks" }}
- name: HERALD_JWT_JWKS_URL
  value: {{ .Values.auth.jwt.jwksUrl | quote }}
{{- else }}
- name: {{ ternary "HERALD_JWT_PUBLIC_KEY" "HERALD_JWT_SECRET" (eq $mode "publicKey") }}
  valueFrom:
    secretKeyRef:
      name: {{ include "herald.jwtSecretName" . }}
      key: {{ include "herald.jwtSecretKey" . }}
{{- end }}
- name: HERALD_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "herald.apiKeySecretName" . }}
      key: {{ include "herald.apiKeySecretKey" . }}
{{- end -}}

{{/* Scratch space for a read-only root filesystem. */}}
{{- define "herald.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}
{{- define "herald.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}
