"""One module per broker (and one per peer library shared by several brokers): the non-msgbus contenders."""
