"""Research programs that nothing else imports: the seed study, the propagation diagnosis, the n_k statistics
command and the geometry table."""
