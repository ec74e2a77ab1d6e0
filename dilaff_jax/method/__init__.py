"""The paper's method as pure functions: dilated affinity and its loss (Eq. 1-5), the n_k statistics (§3.2),
affinity propagation (Eq. 6-7), Table 5's structure losses, and the label conventions they share."""
