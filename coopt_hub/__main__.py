from coopt_hub.cli import main

main()
