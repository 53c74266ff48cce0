"""What runs at a hospital and belongs to the hospital: its policy, its ledger, its privacy
budget and the processes that enforce them (the guard in the SuperNode, the ClientApp runner,
the exporter).  None of it travels in the consortium's app bundle, and the app cannot import,
patch or write to it: it runs in processes of its own."""
