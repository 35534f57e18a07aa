{{/* Common names and labels for the vmstream chart. */}}
{{- define "vmstream.fullname" -}}
{{- if contains "vmstream" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-vmstream" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vmstream.labels" -}}
app.kubernetes.io/name: vmstream
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "vmstream.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "vmstream.streamSecret" -}}
{{- .Values.streaming.existingSecret | default (printf "%s-stream" (include "vmstream.fullname" .)) -}}
{{- end -}}
