"""Token shards: preparing them from text (`prepare`) and reading them in training (`loader`)."""
