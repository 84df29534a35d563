"""The zero-install broker: amqtt inside the controller's event loop, for fleets on one host.

MQTT 3.1.1, anonymous, plain TCP on `embedded_broker_bind` (loopback by default). A fleet
that outgrows one host points `broker_url` at Mosquitto or EMQX with TLS and an ACL
(deploy/mosquitto).
"""

import logging

from amqtt.broker import Broker

from slmops.errors import SlmopsError

log = logging.getLogger(__name__)


class BrokerStartError(SlmopsError):
    pass


async def start(bind: str) -> Broker:
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": bind}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    try:
        await broker.start()
    except Exception as e:  # amqtt wraps the OSError of a taken port in its own error
        raise BrokerStartError(
            f"cannot start the embedded MQTT broker on {bind}: {e}; set embedded_broker_bind to a free "
            "address, or broker_url to an existing broker"
        ) from None
    log.info("embedded MQTT broker (amqtt, MQTT 3.1.1) listening on %s", bind)
    return broker
