#!/bin/sh
# Builds the rig's two USB gadgets in configfs and binds each to a usbip-vudc UDC:
#   camera:  UVC (YUYV 640x360 and 160x120), 1209:0001, serial PANTAU-CAM-1, on usbip-vudc.0
#   speaker: UAC2 playback + capture (a speakerphone), 1209:0002, serial PANTAU-SPK-1, on usbip-vudc.1
# VID 0x1209 is pid.codes' test range; distinct PIDs keep other drivers from grabbing them.
set -eu
G=/sys/kernel/config/usb_gadget

common() {  # name vid pid serial product maxpower
  mkdir -p $G/$1/strings/0x409 $G/$1/configs/c.1/strings/0x409
  echo "$2" > $G/$1/idVendor; echo "$3" > $G/$1/idProduct
  echo 0x0200 > $G/$1/bcdUSB; echo 0x0100 > $G/$1/bcdDevice
  echo 0xEF > $G/$1/bDeviceClass; echo 0x02 > $G/$1/bDeviceSubClass; echo 0x01 > $G/$1/bDeviceProtocol
  echo "Pantau Rig" > $G/$1/strings/0x409/manufacturer
  echo "$5" > $G/$1/strings/0x409/product
  echo "$4" > $G/$1/strings/0x409/serialnumber
  echo "$6" > $G/$1/configs/c.1/MaxPower
  echo "Config 1" > $G/$1/configs/c.1/strings/0x409/configuration
}

camera() {
  common camera 0x1209 0x0001 PANTAU-CAM-1 "Pantau Rig Camera" 500
  F=$G/camera/functions/uvc.0
  mkdir -p $F/control/header/h
  ln -s $F/control/header/h $F/control/class/fs/h
  ln -s $F/control/header/h $F/control/class/ss/h
  mkdir -p $F/streaming/uncompressed/u/360p
  echo 640 > $F/streaming/uncompressed/u/360p/wWidth
  echo 360 > $F/streaming/uncompressed/u/360p/wHeight
  echo 333333 > $F/streaming/uncompressed/u/360p/dwDefaultFrameInterval
  printf '333333\n666666\n' > $F/streaming/uncompressed/u/360p/dwFrameInterval
  echo $((640 * 360 * 2)) > $F/streaming/uncompressed/u/360p/dwMaxVideoFrameBufferSize
  echo $((640 * 360 * 2 * 8 * 15)) > $F/streaming/uncompressed/u/360p/dwMinBitRate
  echo $((640 * 360 * 2 * 8 * 30)) > $F/streaming/uncompressed/u/360p/dwMaxBitRate
  mkdir -p $F/streaming/uncompressed/u/120p   # the smallest size: the one the self-test streams
  echo 160 > $F/streaming/uncompressed/u/120p/wWidth
  echo 120 > $F/streaming/uncompressed/u/120p/wHeight
  echo 333333 > $F/streaming/uncompressed/u/120p/dwDefaultFrameInterval
  printf '333333\n666666\n' > $F/streaming/uncompressed/u/120p/dwFrameInterval
  echo $((160 * 120 * 2)) > $F/streaming/uncompressed/u/120p/dwMaxVideoFrameBufferSize
  echo $((160 * 120 * 2 * 8 * 15)) > $F/streaming/uncompressed/u/120p/dwMinBitRate
  echo $((160 * 120 * 2 * 8 * 30)) > $F/streaming/uncompressed/u/120p/dwMaxBitRate
  mkdir -p $F/streaming/header/h
  ln -s $F/streaming/uncompressed/u $F/streaming/header/h/u
  ln -s $F/streaming/header/h $F/streaming/class/fs/h
  ln -s $F/streaming/header/h $F/streaming/class/hs/h
  ln -s $F/streaming/header/h $F/streaming/class/ss/h
  echo 1024 > $F/streaming_maxpacket
  ln -s $F $G/camera/configs/c.1/
  echo usbip-vudc.0 > $G/camera/UDC
}

speaker() {
  common speaker 0x1209 0x0002 PANTAU-SPK-1 "Pantau Rig Speakerphone" 100
  F=$G/speaker/functions/uac2.0
  mkdir -p $F
  echo 3 > $F/c_chmask; echo 48000 > $F/c_srate; echo 2 > $F/c_ssize   # the host plays into the device
  echo 1 > $F/p_chmask; echo 48000 > $F/p_srate; echo 2 > $F/p_ssize   # the device's microphone
  ln -s $F $G/speaker/configs/c.1/
  echo usbip-vudc.1 > $G/speaker/UDC
}

"$@"
