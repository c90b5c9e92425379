"""CSI Identity service: who we are, what we offer, and whether the meta API answers."""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2

import zstore
from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg
from csi.meta import Meta

PLUGIN_NAME = "csi.zstore.io"


class Identity(pbg.IdentityServicer):
    def __init__(self, meta: Meta | None, controller: bool = True):
        self.meta = meta
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
        """Not ready (rather than an error) while the meta API is unreachable: the plugin
        itself is healthy, restarting it would not help."""
        if self.meta is None:          # a node-only plugin does not talk to the meta API
            return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=await self.meta.ready()))
