"""A Service Bus test double: an AMQP 1.0 server speaking the dialect the azure-servicebus SDK expects."""
