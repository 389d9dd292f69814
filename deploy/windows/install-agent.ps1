# Installs the Pantau agent as a Windows service. Run in an elevated PowerShell:
#   .\install-agent.ps1 -AgentId setjen-ruang-1 -Broker mqtts://broker.example.go.id:8883 -CaFile C:\ca.crt `
#                       -Password (Read-Host -AsSecureString) -Unit setjen -Room ruang-1
# Needs Python 3.11+ for all users (python.org installer) and the Pantau wheel beside this script.
param(
  [Parameter(Mandatory)] [string] $AgentId,
  [Parameter(Mandatory)] [string] $Broker,
  [Parameter(Mandatory)] [string] $CaFile,
  [Parameter(Mandatory)] [securestring] $Password,
  [string] $Unit = "", [string] $Room = ""
)
$ErrorActionPreference = "Stop"
$home_ = "C:\Program Files\Pantau"
$data = "C:\ProgramData\Pantau"
New-Item -ItemType Directory -Force -Path $home_, $data | Out-Null
py -3 -m venv "$home_\venv"
& "$home_\venv\Scripts\pip.exe" install --quiet (Get-ChildItem "$PSScriptRoot\pantau-*.whl").FullName "pyusb" "libusb-package" "psutil" "paho-mqtt"
Copy-Item $CaFile "$data\ca.crt"
$plain = [Runtime.InteropServices.Marshal]::PtrToStringAuto([Runtime.InteropServices.Marshal]::SecureStringToBSTR($Password))
@"
agent_id = "$AgentId"
broker = "$Broker"
ca_file = '$data\ca.crt'
password = "$plain"
state_dir = '$data\state'
labels = { unit = "$Unit", room = "$Room" }
"@ | Set-Content -Encoding UTF8 "$data\agent.toml"
icacls "$data" /inheritance:r /grant:r "SYSTEM:(OI)(CI)F" "Administrators:(OI)(CI)F" | Out-Null
$exe = "`"$home_\venv\Scripts\pantau-agent.exe`" --config `"$data\agent.toml`" run"
sc.exe create PantauAgent binPath= $exe start= auto DisplayName= "Pantau agent" | Out-Null
sc.exe failure PantauAgent reset= 86400 actions= restart/5000/restart/5000/restart/60000 | Out-Null
Start-Service PantauAgent
Write-Host "Pantau agent installed; check with: & '$home_\venv\Scripts\pantau-agent.exe' --config '$data\agent.toml' once"
