"""The durable outbound queue: storage backends (spool directory, RabbitMQ) and the runner that delivers."""
