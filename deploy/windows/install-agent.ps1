# Installs the Pantau agent as a Windows service with one enrollment token. In an elevated PowerShell:
#   .\install-agent.ps1 -Collector https://pantau.example.go.id:8443 -Token pe_... -Fingerprint AB:CD:...
# (`pantau-collector enroll` prints this line.) Needs Python 3.11+ for all users (python.org installer)
# and, without a package index, the agent's Windows wheels beside this script (pip download
# --platform win_amd64 --only-binary=:all: 'pantau[agent]' on a machine that has one).
# The agent's id, labels, broker, CA and broker account come from the collector, fetched over HTTPS
# pinned to the certificate fingerprint by `pantau-agent enroll`; the configuration is readable by
# SYSTEM and Administrators only.
param(
  [Parameter(Mandatory)] [string] $Collector,
  [Parameter(Mandatory)] [string] $Token,
  [Parameter(Mandatory)] [string] $Fingerprint
)
$ErrorActionPreference = "Stop"
$home_ = "C:\Program Files\Pantau"
$data = "C:\ProgramData\Pantau"
New-Item -ItemType Directory -Force -Path $home_, $data | Out-Null
icacls "$data" /inheritance:r /grant:r "SYSTEM:(OI)(CI)F" "Administrators:(OI)(CI)F" | Out-Null
py -3 -m venv "$home_\venv"
$pip = "$home_\venv\Scripts\pip.exe"
if (Get-ChildItem "$PSScriptRoot\*.whl" -ErrorAction SilentlyContinue) {
  & $pip install --quiet --no-index --find-links "$PSScriptRoot" "pantau[agent]"
} else {
  & $pip install --quiet "pantau[agent]"
}
if ($LASTEXITCODE -ne 0) { throw "installing the agent failed" }
$agent = "$home_\venv\Scripts\pantau-agent.exe"
& $agent --config "$data\agent.toml" enroll $Collector $Token --fingerprint $Fingerprint `
  --state-dir "$data\state" --force
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }  # its one line says why (used, expired, unknown token ...)
$exe = "`"$agent`" --config `"$data\agent.toml`" run"
if (Get-Service PantauAgent -ErrorAction SilentlyContinue) { Stop-Service PantauAgent; sc.exe delete PantauAgent | Out-Null }
sc.exe create PantauAgent binPath= $exe start= auto DisplayName= "Pantau agent" | Out-Null
sc.exe failure PantauAgent reset= 86400 actions= restart/5000/restart/5000/restart/60000 | Out-Null
Start-Service PantauAgent
Write-Host "Pantau agent installed; check with: & '$agent' --config '$data\agent.toml' once"
