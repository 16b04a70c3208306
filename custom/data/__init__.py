"""Reading ChestX-ray14 as NIH ships it, datalists, class-balance weights, and the synthetic phantom."""
