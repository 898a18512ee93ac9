"""RabbitMQ adapter for msgbus (``amqp://`` and ``amqps://``), built on aio-pika (sends) and pika (receivers)."""

from ._adapter import RabbitMQAdapter, create

__all__ = ["RabbitMQAdapter", "create"]
