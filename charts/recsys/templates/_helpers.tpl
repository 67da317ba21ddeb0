{{- define "recsys.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "recsys.operatorName" -}}
{{- printf "%s-operator" (include "recsys.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "recsys.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: recsys
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "recsys.operatorSelector" -}}
app.kubernetes.io/name: recsys-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "recsys.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "recsys.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /* A node selector map as the operator's key=value,key=value option. */ -}}
{{- define "recsys.nodeSelectorArg" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
