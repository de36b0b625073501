# The Hydra configs ship inside the package as dpdm.conf (src/dpdm/conf links here), so an installed
# dpdm finds them without a checkout; they are edited here, at the top of the repository.
