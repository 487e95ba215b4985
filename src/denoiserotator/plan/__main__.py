from denoiserotator.plan.jobs import main

main()
