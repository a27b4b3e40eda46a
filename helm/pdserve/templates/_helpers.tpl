{{/* Names, labels and the pdserve config the chart writes. */}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "pdserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "pdserve.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The RayCluster's name; KubeRay names the head Service "<name>-head-svc". */}}
{{- define "pdserve.rayCluster" -}}
{{- printf "%s-ray" (include "pdserve.fullname" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdserve.labels" -}}
{{ include "pdserve.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* GPUs one pod of a worker group holds: instancesPerPod x gpusPerInstance, a whole number. */}}
{{- define "pdserve.gpusPerPod" -}}
{{- $g := mulf .group.instancesPerPod .group.gpusPerInstance -}}
{{- if ne (float64 (int $g)) (float64 $g) -}}
{{- fail (printf "%s: instancesPerPod x gpusPerInstance must be a whole number of GPUs, got %v" .role $g) -}}
{{- end -}}
{{- int $g -}}
{{- end -}}

{{- define "pdserve.cpusPerPod" -}}
{{- mulf .group.instancesPerPod .group.cpusPerInstance | ceil | int -}}
{{- end -}}

{{/*
One pool of pdserve's config: its instance count, its Ray CPUs/GPUs per
instance, a share of the custom Ray resources its pods advertise (so its
instances land on its own pods), and its own vLLM engine arguments.
*/}}
{{- define "pdserve.pool" -}}
{{- $g := .group -}}
{{- $res := dict -}}
{{- range $k, $v := $g.rayResources }}{{ $_ := set $res $k (divf (float64 $v) (float64 $g.instancesPerPod)) }}{{ end -}}
{{- toJson (dict "instances" (mul $g.replicas $g.instancesPerPod) "cpus_per_instance" $g.cpusPerInstance "gpus_per_instance" $g.gpusPerInstance "resources" $res "engine" (dict "engine_args" (deepCopy ($g.engineArgs | default dict)))) -}}
{{- end -}}

{{/* pdserve's config file: the user's `pdserve` values with the pools and addresses the chart owns. */}}
{{- define "pdserve.config" -}}
{{- $p := .Values.prefill -}}
{{- $d := .Values.decode -}}
{{- $cfg := deepCopy .Values.pdserve -}}
{{- $pools := dict "mixed" 0 "prefill" (include "pdserve.pool" (dict "group" $p) | fromJson) "decode" (include "pdserve.pool" (dict "group" $d) | fromJson) -}}
{{- /* A scale-down the gateway runs itself gives up on a decode instance's requests when its pod's preStop would: before the pod is killed. */ -}}
{{- $_ := set $pools "drain_timeout_s" $d.drain.deadlineSeconds -}}
{{- $gateway := mergeOverwrite (get $cfg "gateway" | default dict) (dict "host" "0.0.0.0" "port" .Values.gateway.port) -}}
{{- $ray := mergeOverwrite (get $cfg "ray" | default dict) (dict "address" "auto") -}}
{{- $_ := set $cfg "pools" $pools -}}
{{- $_ := set $cfg "gateway" $gateway -}}
{{- $_ := set $cfg "ray" $ray -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The Secret holding the API key, if any. */}}
{{- define "pdserve.apiKeySecret" -}}
{{- if .Values.gateway.apiKey.existingSecret -}}
{{- .Values.gateway.apiKey.existingSecret -}}
{{- else if .Values.gateway.apiKey.value -}}
{{- printf "%s-api-key" (include "pdserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.rayAuthSecret" -}}
{{- default (include "pdserve.rayCluster" .) .Values.ray.auth.secretName -}}
{{- end -}}

{{/* Env of every pdserve container: Ray auth mode, and the shared env. */}}
{{- define "pdserve.env" -}}
- name: RAY_AUTH_MODE
  value: {{ .Values.ray.auth.mode | quote }}
# Ray starts workers at niceness 15 by default: a niced engine loses its cores to anything else runnable.
- name: RAY_worker_niceness
  value: "0"
{{- with .Values.common.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every pod mounts: the config, /dev/shm, and the shared volumes. */}}
{{- define "pdserve.volumes" -}}
- name: config
  configMap:
    name: {{ include "pdserve.fullname" . }}-config
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.common.shmSize }}
{{- with .Values.common.volumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "pdserve.volumeMounts" -}}
- name: config
  mountPath: /etc/pdserve
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- with .Values.common.volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The gateway's in-cluster URL (what worker pods' preStop drain calls). */}}
{{- define "pdserve.gatewayURL" -}}
{{- printf "http://%s-gateway.%s.svc:%v" (include "pdserve.fullname" .) .Release.Namespace .Values.gateway.service.port -}}
{{- end -}}

{{/*
A worker pod's preStop, as JSON {command, drain}: the group's own
preStop.command if it sets one; else, with drain.enabled, the drain of this
pod's instances through the gateway's registry (deploy/drain_node.py, in the
image), which must end before the grace period does; else none.
*/}}
{{- define "pdserve.preStop" -}}
{{- $g := .group -}}
{{- $own := (($g.preStop | default dict).command | default list) -}}
{{- if $own -}}
{{- toJson (dict "command" $own "drain" false) -}}
{{- else if ($g.drain | default dict).enabled -}}
{{- if ge (int $g.drain.deadlineSeconds) (int $g.terminationGracePeriodSeconds) -}}
{{- fail (printf "%s.drain.deadlineSeconds (%v) must be below %s.terminationGracePeriodSeconds (%v): the pod is killed when its grace period ends" .role $g.drain.deadlineSeconds .role $g.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- toJson (dict "command" (list "python" "/opt/pdserve/bin/drain_node.py") "drain" true) -}}
{{- else -}}
{{- toJson (dict "command" list "drain" false) -}}
{{- end -}}
{{- end -}}

{{/* A worker group of the RayCluster; . is a dict: root, role, group. */}}
{{- define "pdserve.workerGroup" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $gpus := include "pdserve.gpusPerPod" . | int -}}
{{- $rayRes := dict "CPU" (include "pdserve.cpusPerPod" . ) "GPU" (toString $gpus) -}}
{{- $preStop := include "pdserve.preStop" . | fromJson -}}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) -}}
{{- fail (printf "%s: minReplicas (%v) is above maxReplicas (%v)" .role $g.minReplicas $g.maxReplicas) -}}
{{- end -}}
{{- if and $root.Values.autoscaling.enabled (or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas))) -}}
{{- fail (printf "%s: replicas (%v) must lie within minReplicas..maxReplicas (%v..%v) for Ray's autoscaler" .role $g.replicas $g.minReplicas $g.maxReplicas) -}}
{{- end -}}
{{- range $k, $v := $g.rayResources }}{{ $_ := set $rayRes $k (toString $v) }}{{ end -}}
- groupName: {{ .role }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  rayStartParams: {}
  # Ray resources of each node of the group: the CPUs and GPUs its engine
  # instances reserve, plus the group's custom resources.
  resources:
    {{- toYaml $rayRes | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "pdserve.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .role }}
        pdserve.io/role: {{ .role }}
        pdserve.io/gpu-type: {{ $g.gpuType | quote }}
        {{- with $root.Values.common.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include "pdserve.config" $root | sha256sum }}
        {{- with $root.Values.common.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.common.securityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $g.terminationGracePeriodSeconds }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "pdserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            {{- include "pdserve.env" $root | nindent 12 }}
            - name: PDSERVE_ROLE
              value: {{ .role }}
            {{- if $preStop.drain }}
            # For the preStop drain (deploy/drain_node.py): this pod's Ray address, the gateway, its key.
            - name: PDSERVE_NODE_IP
              valueFrom:
                fieldRef: {fieldPath: status.podIP}
            - name: PDSERVE_GATEWAY_URL
              value: {{ include "pdserve.gatewayURL" $root | quote }}
            - name: PDSERVE_DRAIN_DEADLINE_S
              value: {{ $g.drain.deadlineSeconds | quote }}
            {{- with include "pdserve.apiKeySecret" $root }}
            - name: PDSERVE_API_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ . }}
                  key: {{ $root.Values.gateway.apiKey.secretKey }}
            {{- end }}
            {{- end }}
          resources:
            {{- $res := deepCopy $g.resources -}}
            {{- if gt $gpus 0 -}}
            {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $gpus) ($res.limits | default dict)) -}}
            {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" $gpus) ($res.requests | default dict)) -}}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          {{- with $preStop.command }}
          lifecycle:
            preStop:
              exec:
                command:
                  {{- toYaml . | nindent 18 }}
          {{- end }}
          volumeMounts:
            {{- include "pdserve.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "pdserve.volumes" $root | nindent 8 }}
{{- end -}}
