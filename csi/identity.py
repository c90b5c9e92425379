"""CSI Identity service: who we are, what we offer, and that the plugin is serving."""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2

import zstore
from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg

PLUGIN_NAME = "csi.zstore.io"


class Identity(pbg.IdentityServicer):
    def __init__(self, controller: bool = True):
        self.controller = controller   # node-only plugins must not claim CONTROLLER_SERVICE

    async def GetPluginInfo(self, request: pb.GetPluginInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=PLUGIN_NAME, vendor_version=zstore.__version__)

    async def GetPluginCapabilities(self, request: pb.GetPluginCapabilitiesRequest,
                                    context: grpc.aio.ServicerContext) -> pb.GetPluginCapabilitiesResponse:
        caps = []
        if self.controller:
            caps.append(pb.PluginCapability(service=pb.PluginCapability.Service(
                type=pb.PluginCapability.Service.CONTROLLER_SERVICE)))
        # Volumes grow while attached: the chunk servers serve the new size at once.
        caps.append(pb.PluginCapability(volume_expansion=pb.PluginCapability.VolumeExpansion(
            type=pb.PluginCapability.VolumeExpansion.ONLINE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    async def Probe(self, request: pb.ProbeRequest,
                    context: grpc.aio.ServicerContext) -> pb.ProbeResponse:
        """Ready once serving, whatever the meta API's state, in every mode.

        Probe is the plugin's own health, and the livenessprobe sidecar restarts the
        container when it fails. A restart cannot bring the meta API (or etcd) back: a node
        plugin does not use it at all (unstage/unpublish must keep working through a meta
        outage), and the controller's RPCs already answer UNAVAILABLE while it is
        unreachable, which the sidecars retry with backoff."""
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
